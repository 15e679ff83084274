"""The embedding cache on its own: exact round trip, concurrent writers (same and different
hashes), corruption never served, migration of the Parquet layout, indexed lookups."""

import hashlib
import io
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tessera.core.storage import Store
from tessera.features.cache import EmbeddingCache

DIM = 8


def vectors_for(hashes: list[str]) -> list[np.ndarray]:
    return [np.array([int(h[:8], 16) % 997 + i / 7 for i in range(DIM)], np.float32) for h in hashes]


def hashes_for(worker: int, n: int = 200) -> list[str]:
    return [hashlib.sha256(f"{worker}/{i}".encode()).hexdigest() for i in range(n)]


def insert_in_batches(root: str, hashes: list[str], barrier) -> None:
    cache = EmbeddingCache(Store(root), "model/a")
    barrier.wait()  # every writer starts at once
    for i in range(0, len(hashes), 25):
        cache.insert(hashes[i : i + 25], vectors_for(hashes[i : i + 25]))


def test_round_trip_is_exact_and_identities_are_apart(tmp_path):
    cache = EmbeddingCache(Store(str(tmp_path)), "model/a")
    assert cache.lookup(hashes_for(0)) == {}
    hashes = hashes_for(0)
    cache.insert(hashes, vectors_for(hashes))
    got = EmbeddingCache(Store(str(tmp_path)), "model/a").lookup(hashes[:3] + ["0" * 64])
    assert set(got) == set(hashes[:3])
    for h, v in zip(hashes[:3], vectors_for(hashes[:3]), strict=True):
        assert got[h].dtype == np.float32 and np.array_equal(got[h], v)  # bit for bit
    assert EmbeddingCache(Store(str(tmp_path)), "model/b").lookup(hashes) == {}


def test_writers_at_once_lose_nothing_and_duplicate_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    same = hashes_for(0)
    jobs = [same, same, hashes_for(1), hashes_for(2)]  # two writers with the same hashes, two others
    procs = [ctx.Process(target=insert_in_batches, args=(str(tmp_path), hashes, barrier)) for hashes in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    cache = EmbeddingCache(Store(str(tmp_path)), "model/a")
    expected = set(same) | set(hashes_for(1)) | set(hashes_for(2))
    assert cache.count() == len(expected) == 600  # no hash twice
    got = cache.lookup(expected)
    assert set(got) == expected
    for h in list(expected)[:50]:
        assert np.array_equal(got[h], vectors_for([h])[0])


def data_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.lance/data/*.lance"), key=lambda p: p.stat().st_mtime)


def test_flipped_bits_and_truncated_files_are_reported_and_never_served(tmp_path):
    cache = EmbeddingCache(Store(str(tmp_path)), "model/a")
    first, second = hashes_for(0, 100), hashes_for(1, 100)
    cache.insert(first, vectors_for(first))
    cache.insert(second, vectors_for(second))
    flipped, truncated = data_files(tmp_path)
    data = bytearray(flipped.read_bytes())
    at = data.find(vectors_for(first[:1])[0].tobytes())  # a stored float, silently altered
    assert at > 0
    data[at + 2] ^= 0x01
    flipped.write_bytes(bytes(data))

    fresh = EmbeddingCache(Store(str(tmp_path)), "model/a")
    got = fresh.lookup(first)
    assert 0 < len(got) < 100 and fresh.corrupt and "fail their check" in fresh.corrupt[0]
    for h, v in got.items():
        assert np.array_equal(v, vectors_for([h])[0])  # what is served is intact
    bad = set(first) - set(got)
    assert EmbeddingCache(Store(str(tmp_path)), "model/a").lookup(bad) == {}  # deleted, not served later

    truncated.write_bytes(truncated.read_bytes()[:200])
    fresh = EmbeddingCache(Store(str(tmp_path)), "model/a")
    assert fresh.lookup(second) == {} and "unreadable fragments" in fresh.corrupt[0]
    fresh.insert(second, vectors_for(second))  # recomputed: served again
    fresh.insert(sorted(bad), vectors_for(sorted(bad)))
    assert set(EmbeddingCache(Store(str(tmp_path)), "model/a").lookup(first + second)) == set(first + second)


def old_part(folder: Path, hashes: list[str], identity: str) -> Path:
    """A part of the earlier layout: immutable Parquet named by the sha256 of its bytes."""
    vectors = vectors_for(hashes)
    table = pa.table({"sha256": hashes, "vector": [v.tolist() for v in vectors]},
                     schema=pa.schema([("sha256", pa.string()), ("vector", pa.list_(pa.float32()))]))
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({"identity": identity, "dim": str(DIM)}), buf)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{hashlib.sha256(buf.getvalue()).hexdigest()}.parquet"
    path.write_bytes(buf.getvalue())
    return path


def test_the_parquet_layout_is_migrated_on_first_use(tmp_path):
    folder = tmp_path / hashlib.sha256(b"model/a").hexdigest()[:24]
    old_part(folder, hashes_for(0, 30), "model/a")
    altered = old_part(folder, hashes_for(1, 30), "model/a")
    altered.write_bytes(altered.read_bytes()[:-10])  # no longer matches its name
    cache = EmbeddingCache(Store(str(tmp_path)), "model/a")
    got = cache.lookup(hashes_for(0, 30) + hashes_for(1, 30))
    assert set(got) == set(hashes_for(0, 30)) and len(cache.corrupt) == 1
    assert np.array_equal(got[hashes_for(0, 30)[5]], vectors_for(hashes_for(0, 30))[5])
    assert not folder.exists()  # migrated once: the parts are gone


def test_lookups_go_through_the_key_index(tmp_path):
    cache = EmbeddingCache(Store(str(tmp_path)), "model/a")
    for worker in range(3):
        cache.insert(hashes_for(worker), vectors_for(hashes_for(worker)))
    cache.maintain()  # the appended rows folded into the index
    dataset = EmbeddingCache(Store(str(tmp_path)), "model/a")._open()
    plan = dataset.scanner(columns=["sha256"], filter=pc.field("sha256").isin(hashes_for(1)[:3])).explain_plan()
    assert "ScalarIndexQuery" in plan and "BTree" in plan
    assert dataset.describe_indices()[0].num_rows_indexed == dataset.count_rows() == 600


def test_a_storage_error_is_raised_and_never_costs_a_row(tmp_path, monkeypatch):
    """Lance reports storage trouble (after its own client's retries) as text in an OSError; the
    cache raises it, and a fragment is dropped only when it fails to decode twice without it."""
    import lance

    monkeypatch.setattr("tessera.features.cache.PROBE_AGAIN_S", 0.01)
    cache = EmbeddingCache(Store(str(tmp_path)), "model/a")
    hashes = hashes_for(0, 100)
    cache.insert(hashes, vectors_for(hashes))
    storage = OSError("LanceError(IO): Generic S3 error: Error after 10 retries in 2.9s, max_retries: 10, "
                      "retry_timeout: 180s, source: connection reset by peer")
    undecodable = OSError("LanceError(IO): Corrupt file: unexpected end of data")
    read, probe = lance.LanceDataset.to_table, lance.fragment.LanceFragment.to_table

    def failing(error, then=None, times=10**9):
        calls = {"n": 0}

        def to_table(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] <= times:
                raise error
            return (then or read)(self, *args, **kwargs)
        return to_table

    monkeypatch.setattr(lance.LanceDataset, "to_table", failing(storage))
    with pytest.raises(OSError, match="connection reset"):
        EmbeddingCache(Store(str(tmp_path)), "model/a").lookup(hashes)
    monkeypatch.setattr(lance.LanceDataset, "to_table", failing(undecodable, times=1))
    monkeypatch.setattr(lance.fragment.LanceFragment, "to_table", failing(storage))  # ... and the probe too
    with pytest.raises(OSError, match="connection reset"):
        EmbeddingCache(Store(str(tmp_path)), "model/a").lookup(hashes)
    monkeypatch.setattr(lance.LanceDataset, "to_table", failing(undecodable, times=1))
    monkeypatch.setattr(lance.fragment.LanceFragment, "to_table", failing(undecodable, then=probe, times=1))
    with pytest.raises(OSError, match="Corrupt file"):  # it decodes the second time: not dropped, raised
        EmbeddingCache(Store(str(tmp_path)), "model/a").lookup(hashes)
    monkeypatch.undo()
    fresh = EmbeddingCache(Store(str(tmp_path)), "model/a")
    assert len(fresh.lookup(hashes)) == 100 and fresh.count() == 100 and fresh.corrupt == []
