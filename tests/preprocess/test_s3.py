"""Manifest, inputs and output on a real S3-compatible server (moto's server mode on loopback)."""

import io
import json
import tarfile

import pytest
import s3fs

from tessera.core.storage import Store
from tessera.features.config import EmbedConfig
from tessera.features.stage import run_embed_stage
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.layout import committed_shards, read_index
from tessera.preprocess.stage import run_shard_stage
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


@pytest.mark.slow
def test_a_flaky_store_costs_retries_never_data(ray_session, s3_options, flaky_s3):
    """The store is out for 4 s of every 6 (each request answered 503 SlowDown, or its
    connection dropped) while the shard and embedding stages run: the same shards, index,
    rejects, markers and sidecars as on a calm store, every vector in the cache (no fragment
    taken for corrupt), the retries counted in the summaries."""
    fs = s3fs.S3FileSystem(**s3_options["s3"])
    fs.mkdir("flaky")
    fs.put(str(SAMPLE) + "/", "flaky/sample/", recursive=True)
    cfg, text_only = ShardConfig(samples_per_shard=6, labels=LABELS), EmbedConfig(image=None, audio=None, video=None)
    calm_out = Store("s3://flaky/calm", s3_options)
    calm = run_shard_stage("s3://flaky/sample/manifest.jsonl", calm_out, cfg, progress=False)
    run_embed_stage(calm_out, text_only, progress=False)
    out = Store("s3://flaky/out", flaky_s3.options)
    flaky_s3.outages, flaky_s3.faults = (6.0, 4.0), 0
    try:
        flaky = run_shard_stage("s3://flaky/sample/manifest.jsonl", out, cfg, progress=False)
        embedded = run_embed_stage(out, text_only, progress=False)
    finally:
        flaky_s3.outages = None
    print(f"\n{flaky_s3.faults} of {flaky_s3.requests} requests failed; store calls retried: shard "
          f"{flaky.store_retries}, embed {embedded.store_retries}")
    assert flaky_s3.faults >= 10 and flaky.store_retries + embedded.store_retries > 0
    assert (flaky.accepted, flaky.rejected, flaky.shards) == (calm.accepted, calm.rejected, calm.shards)
    assert embedded.computed == embedded.modalities["text"]["unique"] == embedded.cache_rows["text"] == 17
    assert embedded.cache_corrupt == [] and embedded.errors == 0

    def outputs(folder: str) -> dict[str, bytes]:
        names = [p for p in fs.find(f"flaky/{folder}") if "embed-cache" not in p
                 and not p.endswith(("summary.json", "manifest-source.json", "lease.json"))]
        return {p.split("/", 2)[2]: fs.cat_file(p) for p in names}

    # a tar, marker, index and rejects part and a sidecar per shard; the config, the duplicates, the sizes
    assert outputs("out") == outputs("calm") and len(outputs("calm")) == 3 * 5 + 3


def _read_in_fork(store: Store, name: str) -> bytes | str:
    """NAME read by STORE in a child forked from this process (as DataLoader workers are)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    answers = context.Queue()

    def child() -> None:
        try:
            answers.put(store.read_bytes(name) + bytes(store.read_parquet("t.parquet").num_rows))
        except Exception as error:  # sent back, so the test shows what the child hit
            answers.put(f"{type(error).__name__}: {error}")

    process = context.Process(target=child)
    process.start()
    answer = answers.get(timeout=60)
    process.join()
    return answer


def test_a_store_works_in_a_process_forked_after_it_was_used(s3_options):
    import pyarrow as pa

    fs = s3fs.S3FileSystem(**s3_options["s3"])
    fs.mkdir("forked")
    store = Store("s3://forked/out", s3_options)
    store.write_bytes("a.bin", b"parent")
    store.write_parquet("t.parquet", pa.table({"k": [1, 2]}))
    assert store.read_bytes("a.bin") == b"parent"  # the parent's filesystem now holds its event loop
    assert _read_in_fork(store, "a.bin") == b"parent" + bytes(2)
    assert store.read_bytes("a.bin") == b"parent"  # and the parent's still works
