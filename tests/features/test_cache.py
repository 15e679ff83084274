"""The embedding cache on its own: round trip, concurrent writers, corruption, identity isolation."""

import multiprocessing as mp

import numpy as np

from features.cache import EmbeddingCache


def vectors_for(hashes: list[str], dim: int = 8) -> np.ndarray:
    return np.array([[int(h, 16) % 997 + i for i in range(dim)] for h in hashes], dtype=np.float32)


def hashes_for(worker: int, batch: int) -> list[str]:
    return [f"{worker:04x}{batch:04x}{i:056x}" for i in range(10)]


def write_parts(root: str, worker: int) -> None:
    cache = EmbeddingCache(root, "model/a")
    for batch in range(20):
        hashes = hashes_for(worker, batch)
        cache.append(hashes, vectors_for(hashes), 8)


def test_round_trip_and_identity_isolation(tmp_path):
    cache = EmbeddingCache(str(tmp_path), "model/a")
    hashes = hashes_for(0, 0)
    part = cache.append(hashes, vectors_for(hashes), 8)
    scan = cache.scan()
    assert scan.parts == [part] and scan.hashes == set(hashes) and scan.dim == 8
    got = cache.read(scan.parts, set(hashes[:3]))
    assert set(got) == set(hashes[:3])
    np.testing.assert_array_equal(got[hashes[1]], vectors_for(hashes)[1])
    assert EmbeddingCache(str(tmp_path), "model/b").scan().hashes == set()


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_parts, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    cache = EmbeddingCache(str(tmp_path), "model/a")
    while any(p.is_alive() for p in procs):
        assert cache.scan().corrupt == []  # readers racing the writers see only whole parts
    for p in procs:
        p.join()
        assert p.exitcode == 0
    scan = cache.scan()
    expected = {h for w in range(4) for b in range(20) for h in hashes_for(w, b)}
    assert scan.hashes == expected and scan.corrupt == [] and len(scan.parts) == 80
    got = cache.read(scan.parts, expected)
    for h in list(expected)[:50]:
        np.testing.assert_array_equal(got[h], vectors_for([h])[0])


def test_altered_part_is_never_served(tmp_path):
    cache = EmbeddingCache(str(tmp_path), "model/a")
    hashes = hashes_for(0, 0)
    part = cache.append(hashes, vectors_for(hashes), 8)
    with open(part, "r+b") as f:  # flip one byte in the middle: still a Parquet file maybe, never trusted
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cache.read([part], set(hashes)) == {}
    scan = cache.scan()
    assert scan.hashes == set() and scan.corrupt == []  # already set aside by read
    assert (tmp_path / part.split("/")[-2] / (part.split("/")[-1] + ".corrupt")).exists()
