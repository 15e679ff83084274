"""Manifest, inputs and output on a real S3-compatible server (moto's server mode on loopback)."""

import io
import json
import tarfile

import s3fs

from preprocess.config import ShardConfig
from preprocess.layout import committed_shards, read_index
from preprocess.stage import run_shard_stage
from preprocess.storage import Store
from tests.conftest import LABELS, REPO

SAMPLE = REPO / "workflows" / "sample_corpus"


def test_shard_from_s3_to_s3(ray_session, s3_options):
    fs = s3fs.S3FileSystem(**s3_options["s3"])
    fs.mkdir("corpus")
    fs.put(str(SAMPLE) + "/", "corpus/sample/", recursive=True)
    cfg = ShardConfig(samples_per_shard=6, labels=LABELS)
    out = Store("s3://corpus/out", s3_options)
    summary = run_shard_stage("s3://corpus/sample/manifest.jsonl", out, cfg, progress=False)
    assert (summary.inputs, summary.accepted, summary.shards) == (17, 17, 3)
    assert committed_shards(out) == [f"shard-00000{i}.tar" for i in range(3)]
    assert not fs.glob("corpus/out/*.tmp-*") and not fs.glob("corpus/out/*/*.tmp-*")
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file("corpus/out/shard-000000.tar"))) as tar:
        names = tar.getnames()
    assert "camera.jpeg" in names and "page.txt" in names
    assert read_index(out, ["key", "label"]).num_rows == 17
    assert len(fs.glob("corpus/out/index/shard-*.parquet")) == 3
    assert json.loads(fs.cat_file("corpus/out/summary.json"))["accepted"] == 17

    again = run_shard_stage("s3://corpus/sample/manifest.jsonl", out, cfg, progress=False)
    assert again.resumed_shards == 3 and again.up_to_date
