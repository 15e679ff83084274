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


def test_a_flaky_store_costs_retries_never_data(ray_session, s3_options, flaky_s3):
    """The store is out for 4 s of every 6 (each request answered 503 SlowDown, or its
    connection dropped): the same shards, index, rejects and markers as on a calm store; the
    retries counted in the summary."""
    fs = s3fs.S3FileSystem(**s3_options["s3"])
    fs.mkdir("flaky")
    fs.put(str(SAMPLE) + "/", "flaky/sample/", recursive=True)
    cfg = ShardConfig(samples_per_shard=6, labels=LABELS)
    calm = run_shard_stage("s3://flaky/sample/manifest.jsonl", Store("s3://flaky/calm", s3_options), cfg,
                           progress=False)
    flaky_s3.outages, flaky_s3.faults = (6.0, 4.0), 0
    try:
        flaky = run_shard_stage("s3://flaky/sample/manifest.jsonl", Store("s3://flaky/out", flaky_s3.options), cfg,
                                progress=False)
    finally:
        flaky_s3.outages = None
    print(f"\n{flaky_s3.faults} requests failed; {flaky.store_retries} store calls retried")
    assert flaky_s3.faults >= 10 and flaky.store_retries > 0
    assert (flaky.accepted, flaky.rejected, flaky.shards) == (calm.accepted, calm.rejected, calm.shards)

    def outputs(folder: str) -> dict[str, bytes]:
        names = [p for p in fs.find(f"flaky/{folder}") if not p.endswith(("summary.json", "manifest-source.json"))]
        return {p.split("/", 2)[2]: fs.cat_file(p) for p in names}

    assert outputs("out") == outputs("calm") and len(outputs("calm")) == 3 * 4 + 2  # tar, marker, index, rejects
