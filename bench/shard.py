"""Shard-stage throughput against a plain loop and against the bare image work, in one run.

    python bench/shard.py [--n 2000] [--workers 2] [--data DIR]

(a) the shard stage (Ray tasks, `--workers` CPUs; Ray start-up reported apart),
(b) one process looping over the same rows with the same per-sample function and the
    same tar writer (what a user would write without tessera),
(c) the fastest bare decode -> resize -> encode of the same images with the same output
    settings (draft decoding, one process, no framework): the machine's physical limit.
Prints samples/s of each and the ratios a/b and a/(c x workers).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tessera.core.storage import Store  # noqa: E402
from tessera.preprocess.config import ShardConfig  # noqa: E402
from tessera.preprocess.image import draft_side, resize_image  # noqa: E402
from tessera.preprocess.manifest import LineReject, fetch_batch, iter_manifest  # noqa: E402
from tessera.preprocess.sample import process_sample  # noqa: E402
from tessera.preprocess.stage import run_shard_stage  # noqa: E402

MAKE_LARGE = REPO.parent / "shared" / "corpus" / "make_large.py"
MINI = MAKE_LARGE.parent / "mini"
LABELS = ("person", "animal", "object", "science", "texture", "document", "scene")


def ensure_corpus(folder: Path, n: int) -> tuple[Path, Path]:
    """The corpus, and the same rows without audio (the work (c) does, plus captions)."""
    manifest = folder / "manifest.jsonl"
    if not manifest.exists() or sum(1 for _ in manifest.open()) != n:
        subprocess.run([sys.executable, str(MAKE_LARGE), str(folder), str(n)], check=True)
    images_only = folder / "manifest-images.jsonl"
    rows = [json.loads(line) for line in manifest.open()]
    images_only.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "audio"}) + "\n" for r in rows))
    return manifest, images_only


def start_ray(workers: int) -> float:
    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    # Start every worker process and import what the stage's tasks import there (the shard
    # task's module, DuckDB for the dedup pass), as (b) and (c) have their imports done before
    # timing; the start-up is reported on its own.
    warm = ray.remote(num_cpus=1)(
        lambda: __import__("tessera.preprocess.stage") and __import__("duckdb") and time.sleep(0.5))
    ray.get([warm.remote() for _ in range(workers)])
    return time.perf_counter() - started


def stage_rate(manifest: Path, out: Path, cfg: ShardConfig) -> tuple[float, dict]:
    t0 = time.perf_counter()
    summary = run_shard_stage(str(manifest), Store(str(out)), cfg, progress=False).to_json()
    return summary["accepted"] / (time.perf_counter() - t0), summary


def loop_rate(manifest: Path, out: Path, cfg: ShardConfig) -> float:
    t0 = time.perf_counter()
    rows = [r for r in iter_manifest(str(manifest), cfg, Store(str(manifest))) if not isinstance(r, LineReject)]
    written = 0
    tar_index = 0
    tar = None
    for row, raw in fetch_batch(rows, Store(str(manifest)), cfg.max_input_bytes):
        if written % cfg.samples_per_shard == 0:
            if tar:
                tar.close()
            tar = wds.TarWriter(str(out / f"loop-{tar_index:06d}.tar"), encoder=False)
            tar_index += 1
        for sample in process_sample(row, raw, cfg):
            tar.write(sample.record)
        written += 1
    tar.close()
    return written / (time.perf_counter() - t0)


def bare_rate(manifest: Path, cfg: ShardConfig) -> float:
    paths = [manifest.parent / json.loads(line)["image"] for line in manifest.open()]
    side = draft_side(cfg.image)
    t0 = time.perf_counter()
    for path in paths:
        img = Image.open(io.BytesIO(path.read_bytes()))
        img.draft("RGB", (side, side))
        img = resize_image(img.convert("RGB"), cfg.image.size, "crop")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=cfg.image.quality)
    return len(paths) / (time.perf_counter() - t0)


def alternated(repeats: int, loop: Callable[[int], float], stage: Callable[[int], tuple[float, dict]]
               ) -> tuple[float, float, list[float], dict]:
    """REPEATS runs of LOOP(i) then STAGE(i), alternated so that a slow spell of this shared
    machine weighs on both alike: the medians of the stage's and the loop's rates, each pair's
    ratio, and the last stage summary."""
    pairs, summary = [], {}
    for i in range(repeats):
        b = loop(i)
        a, summary = stage(i)
        pairs.append((a, b))
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            [a / b for a, b in pairs], summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="(b) and (a) measured alternately this many times")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-corpus")
    args = ap.parse_args()
    manifest, images_only = ensure_corpus(args.data, args.n)
    cfg = ShardConfig(labels=LABELS)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        c = bare_rate(manifest, cfg)  # also warms the page cache for every image
        ray_start = start_ray(args.workers)
        a, b, ratios, summary = alternated(args.repeats, lambda i: loop_rate(manifest, out, cfg),
                                           lambda i: stage_rate(manifest, out / f"stage-{i}", cfg))
        a_img, _ = stage_rate(images_only, out / "stage-images", cfg)
    audio = summary["statistics"]["audio"]["clips"]
    n = args.workers
    print(f"samples: {args.n} ({summary['accepted']} accepted, {audio} with audio), cores: {os.cpu_count()}, "
          f"workers: {n}; medians of {args.repeats} alternated runs of (b) and (a)")
    print(f"(a)  tessera shard stage    : {a:7.1f} samples/s  (Ray + worker start-up {ray_start:.1f} s, not included)")
    print(f"(a') same, rows without audio: {a_img:7.1f} samples/s  (image + caption: the work (c) measures)")
    print(f"(b)  single-process loop     : {b:7.1f} samples/s  (same per-sample function and tar writer)")
    print(f"(c)  bare decode/resize/enc  : {c:7.1f} images/s   (images only, draft decoding, no framework)")
    print(f"a/b        = {a / b:.2f}   (target >= 1.75; per pair {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"a/(c x {n})  = {a / (c * n):.2f}   (target >= 0.75; (a) also decodes, resamples and encodes audio)")
    print(f"a'/(c x {n}) = {a_img / (c * n):.2f}")


if __name__ == "__main__":
    main()
