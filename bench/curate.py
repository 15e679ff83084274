"""Curation costs, in one run: near dedup in the shard stage, semantic dedup on cached vectors,
and a plain datasketch loop for the same near-dup text workload.

    python bench/curate.py [--images 100000] [--texts 100000 1000000] [--vectors 1000000]
                           [--workers 2] [--data DIR]

images   N tiny images (16x16 seeded noise PNGs, 5 % of them near copies: the same pixels
         brightened by 4 levels) with captions: `tessera shard` with near dedup off, then on
         (image max_distance 6), into empty OUTs, `--repeat` times interleaved: the near-dup
         cost as a ratio of the mean wall times.
texts    text-only corpora (15 words drawn from 5,000, 5 % near copies with one word changed):
         `tessera shard` with text near dedup (threshold 0.7): rows/s, the driver's and the
         largest worker's peak RSS (VmHWM) per size; at the smallest size also with near dedup
         off: what near dedup adds to the wall time.
loop     the same near-dup workload on the smallest text corpus in one process with datasketch
         (MinHash of the same shingles, MinHashLSH insert + query per row): its wall time
         against what tessera's near dedup adds (the previous line).
vectors  the largest text output with synthetic 384-d sidecars (unit noise, 2 % planted near
         copies at cosine ~0.99): `tessera curate` with semantic text dedup (eps 0.05, clusters
         auto): wall, the largest task's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scale import measured, sets, tessera  # noqa: E402

from tessera.core.storage import Store  # noqa: E402
from tessera.preprocess.config import NearTextConfig  # noqa: E402
from tessera.preprocess.layout import committed_shards  # noqa: E402
from tessera.preprocess.near import lsh_bands, shingles  # noqa: E402

COPIES = 0.05
VOCABULARY = 5000
TEXT_NEAR = sets(shard__near_dedup__text__threshold=0.7)
IMAGE_NEAR = sets(shard__near_dedup__image__max_distance=6)


def image_corpus(folder: Path, n: int) -> Path:
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "manifest.tmp").open("w") as f:
        for i in range(n):
            path = f"images/{i}.png"
            seed = int(rng.integers(i)) if i and rng.random() < COPIES else i  # a copy of an earlier one
            pixels = np.random.default_rng(seed).integers(0, 252, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels + (4 if seed != i else 0)).save(folder / path)
            f.write(json.dumps({"key": f"s{i:08d}", "image": path, "text": f"caption {i}"}) + "\n")
    (folder / "manifest.tmp").rename(manifest)
    return manifest


def text_rows(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(VOCABULARY)]
    texts = []
    for i in range(n):
        if i and rng.random() < COPIES:
            copy = texts[int(rng.integers(i))].split()
            copy[int(rng.integers(len(copy)))] = words[int(rng.integers(VOCABULARY))]
            texts.append(" ".join(copy))
        else:
            texts.append(" ".join(words[j] for j in rng.integers(0, VOCABULARY, 15)))
    return texts


def text_corpus(folder: Path, n: int) -> Path:
    manifest = folder / "manifest.jsonl"
    if not manifest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.tmp").write_text("".join(json.dumps({"key": f"t{i:08d}", "text": t}) + "\n"
                                                     for i, t in enumerate(text_rows(n))))
        (folder / "manifest.tmp").rename(manifest)
    return manifest


def shard(manifest: Path, out: Path, settings: list[str], workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    got = measured(tessera("shard", str(manifest), str(out), *settings, "--set", "shard.image.size=32",
                           workers=workers))
    summary = json.loads((out / "summary.json").read_text())
    return {**got, "duplicates": summary["duplicates"], "inputs": summary["inputs"]}


def datasketch_loop(texts: list[str]) -> tuple[float, int]:
    """Near-dup detection as one would write it with datasketch: (seconds, rows found)."""
    from datasketch import MinHash, MinHashLSH

    cfg = NearTextConfig(threshold=0.7)
    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm, None)
    started = time.perf_counter()
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(bands, rows))
    signatures: dict[int, MinHash] = {}
    found = 0
    for i, text in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm)
        m.update_batch([s.encode() for s in shingles(text, cfg.shingle_chars)])
        if any(signatures[j].jaccard(m) >= cfg.threshold for j in lsh.query(m)):
            found += 1
        lsh.insert(i, m)
        signatures[i] = m
    return time.perf_counter() - started, found




def synthetic_sidecar(args: tuple[str, str, int]) -> None:
    """Unit-noise 384-d text vectors for a shard, COPIES of them near copies of a vector drawn
    from a pool every shard shares (so duplicates span shards)."""
    import pyarrow as pa

    from tessera.preprocess.layout import read_index_part

    root, name, seed = args
    store = Store(root)
    keys = read_index_part(store, name, ["key"]).column("key").to_pylist()
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(keys), 384)).astype(np.float32)
    pool = np.random.default_rng(0).standard_normal((1000, 384)).astype(np.float32)
    copies = rng.random(len(keys)) < 0.02
    vectors[copies] = pool[rng.integers(0, 1000, copies.sum())] + rng.normal(0, 0.07, (copies.sum(), 384))
    table = pa.table({"key": pa.array(keys), "text": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)),
                                                                                       384)})
    store.write_parquet(name.removesuffix(".tar") + ".emb.parquet", table)


def vectors_section(out: Path, workers: int) -> dict:
    from tessera.features.layout import EmbedSummary

    store = Store(str(out))
    names = committed_shards(store)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(synthetic_sidecar, [(str(out), s, i) for i, s in enumerate(names)], chunksize=16))
    samples = json.loads((out / "summary.json").read_text())["accepted"]
    EmbedSummary(samples=samples, shards=len(names), sidecars_written=len(names), sidecars_up_to_date=0,
                 encoders={"text": "synthetic"}, config={}, dims={"text": 384},
                 modalities={"text": {"samples": samples}}, computed=samples, cache_hits=0).write(store)
    shutil.rmtree(out / "curate", ignore_errors=True)
    got = measured(tessera("curate", str(out), *sets(curate__semantic__modalities=["text"]), workers=workers))
    summary = json.loads((out / "curate" / "summary.json").read_text())
    return {**got, "vectors": samples, "semantic_duplicates": summary["semantic_duplicates"]["text"],
            "clusters": summary["clusters"]["text"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--texts", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--vectors", action="store_true", help="semantic dedup on the largest text output")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved runs of the images section")
    ap.add_argument("--data", type=Path, default=REPO / "bench-data" / "curate")
    args = ap.parse_args()
    w = args.workers

    if args.images:
        corpus = image_corpus(args.data / f"images-{args.images}", args.images)
        offs, ons = [], []
        for _ in range(args.repeat):  # interleaved: the machine's drift hits both alike
            offs.append(shard(corpus, corpus.parent / "off", [], w)["seconds"])
            on = shard(corpus, corpus.parent / "on", IMAGE_NEAR, w)
            ons.append(on["seconds"])
        off_s, on_s = sum(offs) / len(offs), sum(ons) / len(ons)
        print(f"images {args.images}: near dedup off {' / '.join(f'{t:.1f}' for t in offs)} s, on "
              f"{' / '.join(f'{t:.1f}' for t in ons)} s ({on['duplicates']} near copies dropped): means "
              f"x{on_s / off_s:.3f} (target <= 1.15)")
    results = {}
    for n in sorted(args.texts):
        corpus = text_corpus(args.data / f"texts-{n}", n)
        results[n] = shard(corpus, corpus.parent / "on", TEXT_NEAR, w)
        r = results[n]
        print(f"texts {n}: {n / r['seconds']:.0f} rows/s, {r['duplicates']} near copies dropped, driver "
              f"{r['driver_mb']:.0f} MB, largest worker {r['worker_mb']:.0f} MB")
    sizes = sorted(results)
    for small, large in zip(sizes, sizes[1:], strict=False):
        print(f"  driver RSS {large}/{small}: x{results[large]['driver_mb'] / results[small]['driver_mb']:.2f} "
              "(target <= 1.25)")
    if sizes:
        n = sizes[0]
        corpus = text_corpus(args.data / f"texts-{n}", n)
        off = shard(corpus, corpus.parent / "off", [], w)
        added = results[n]["seconds"] - off["seconds"]
        print(f"texts {n}: near dedup adds {added:.1f} s to {off['seconds']:.1f} s")
        loop_s, found = datasketch_loop([json.loads(line)["text"] for line in corpus.open()])
        print(f"loop {n}: datasketch MinHashLSH in one process {loop_s:.1f} s ({found} near copies); "
              f"loop / tessera's near dedup: x{loop_s / max(added, 1e-9):.2f} (target >= 1.5)")
    if args.vectors and sizes:
        v = vectors_section(args.data / f"texts-{sizes[-1]}" / "on", w)
        print(f"vectors {v['vectors']}: tessera curate {v['seconds']:.1f} s, {v['clusters']} clusters, "
              f"{v['semantic_duplicates']} semantic duplicates, driver {v['driver_mb']:.0f} MB, largest task "
              f"{v['worker_mb']:.0f} MB")


if __name__ == "__main__":
    main()
