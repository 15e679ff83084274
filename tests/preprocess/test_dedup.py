"""Exact dedup after the shard tasks: the earliest manifest row wins, across shards and manifest
files, whatever the number of workers."""

import json
import os
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.core.storage import Store
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.stage import run_shard_stage
from tests.conftest import MINI, REPO, TESSERA, index_rows, reject_rows


def write_parts(folder):
    """A manifest of two JSONL parts and a Parquet part with duplicates spread over shards:
    a.jsonl holds lines 1-12, b.parquet rows 1-6, c.jsonl lines 1-8 (4 rows a shard)."""
    folder.mkdir()
    a = [{"key": f"a{i}", "text": f"caption a{i}"} for i in range(1, 13)]
    a[2] = {"key": "k", "image": "missing.png", "text": "first claim of k"}  # claims k, then rejected
    a[4] = {"key": "x", "text": "T1"}
    a[5] = {"key": "x", "text": "T2"}  # a duplicate key: dropped before content is compared...
    a[9] = {"key": "y", "text": "T2"}  # ... so T2 is first seen here and y is kept
    a[10] = {"key": "k", "text": "second claim of k"}  # the key was claimed on line 3
    a[11] = {"key": "dup-of-a1", "text": "caption a1"}  # same content as line 1, another shard
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    pq.write_table(pa.table({"key": ["b1", "a2", "b3", "b4", "b5", "b6"],
                             "text": ["caption b1", "other", "caption a1", "caption b4", "caption b5", "caption b6"]}),
                   folder / "b.parquet", row_group_size=4)
    c = [{"key": f"c{i}", "text": f"caption c{i}"} for i in range(1, 9)]
    c[0] = {"key": "c1", "text": "caption b4"}  # content of b.parquet row 4
    shutil.copy(MINI / "images" / "horse.png", folder / "horse.png")  # (inputs lie under the manifest's root)
    c[7] = {"key": "c8", "image": "horse.png", "text": "a horse"}
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in c))


@pytest.mark.slow
def test_earliest_row_wins_across_shards_and_files_with_one_or_two_workers(ray_session, tmp_path):
    write_parts(tmp_path / "parts")
    done = subprocess.run([*TESSERA, "shard", str(tmp_path / "parts"), str(tmp_path / "one"),
                           "--workers", "1", "--samples-per-shard", "4", "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads(done.stdout.splitlines()[-1])  # a local Ray with one CPU: one shard at a time
    two = run_shard_stage(str(tmp_path / "parts"), Store(str(tmp_path / "two")), ShardConfig(samples_per_shard=4),
                          progress=False).to_json()  # the session's Ray, two at a time
    counts = ("inputs", "accepted", "rejected", "shards")
    assert [one[k] for k in counts] == [two[k] for k in counts] == [26, 19, 7, 3 + 2 + 2]
    kept = {(r["file"], r["line"], r["key"]) for r in index_rows(tmp_path / "one")}
    assert kept == {(r["file"], r["line"], r["key"]) for r in index_rows(tmp_path / "two")}
    rejects = sorted((r["file"], r["line"], r["reason"]) for r in reject_rows(tmp_path / "one"))
    assert rejects == sorted((r["file"], r["line"], r["reason"]) for r in reject_rows(tmp_path / "two"))
    reasons = {(f, line): reason for f, line, reason in rejects}
    assert reasons[("a.jsonl", 6)] == "duplicate key (first on line 5)"
    assert reasons[("a.jsonl", 11)] == "duplicate key (first on line 3)"  # line 3 was rejected, yet first
    assert reasons[("a.jsonl", 3)].startswith("file not found")
    assert reasons[("a.jsonl", 12)] == "duplicate content of 'a1' (first on line 1)"
    assert reasons[("b.parquet", 2)] == "duplicate key (first on line 2 of a.jsonl)"
    assert reasons[("b.parquet", 3)] == "duplicate content of 'a1' (first on line 1 of a.jsonl)"
    assert reasons[("c.jsonl", 1)] == "duplicate content of 'b4' (first on line 4 of b.parquet)"
    assert ("a.jsonl", 10, "y") in kept and ("a.jsonl", 5, "x") in kept and ("c.jsonl", 8, "c8") in kept
    assert len(kept) + len(rejects) == 26 and len(rejects) == 7
    # the dropped rows are still in their tars (not rewritten), marked in the index parts
    part = pq.read_table(tmp_path / "one" / "index" / "shard-000002.parquet").to_pylist()
    assert {r["key"]: r["duplicate_of"] for r in part} == {"a9": None, "y": None, "k": "k", "dup-of-a1": "a1"}
