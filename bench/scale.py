"""Corpus scale: do the stages keep their memory flat and their time linear, and do re-runs
stay cheap, as the corpus grows? Every figure is a `tessera` command run as a process; peak
RSS is VmHWM read from /proc while the driver and its Ray workers run.

    python bench/scale.py [--sections shard embed train] [--sizes 10000 100000 1000000]
                          [--images-up-to 100000] [--embed-sizes 20000 100000 1000000]
                          [--train-sizes 100000 1000000] [--workers 2]

shard  on synthetic corpora the bench writes (`text`: distinct inline captions; `images`:
       the same plus a distinct 16x16 PNG of seeded noise per row, stored at 32 px): `tessera shard` into an
       empty OUT (wall, rows/s, driver and largest worker peak RSS), the same command on the
       complete OUT, and `tessera refresh` twice (version 1, then a refresh with nothing new).
embed  on the `images` corpora, with a tiny random CLIP tower (32 px, one layer) and text,
       audio and video off, so the model is cheap: a cold `tessera embed` (rows/s, driver and
       worker RSS), then the sidecars deleted and `tessera embed` again: every vector is in
       the cache, only the sidecars are rebuilt.
train  on the `text` shards with synthetic sidecars of realistic widths (384 + 512 + 768
       float32), `tessera train` (2 workers, 2 loader workers each, micro-batch 256, 60
       steps): the largest trainer or loader process's peak RSS.
Prints one line per corpus and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tessera.core.storage import Store  # noqa: E402
from tessera.preprocess.layout import committed_shards, read_index_part  # noqa: E402

LABELS = ["person", "animal", "object", "science", "texture", "document", "scene"]
WORDS = ["red", "green", "blue", "small", "large", "quiet", "loud", "old", "new", "bright", "dark", "round"]
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 16, "projection_dim": 32}
WIDTHS = {"text": 384, "image": 512, "audio": 768}


def make_corpus(folder: Path, n: int, images: bool) -> Path:
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.tmp").open("w") as f:
        for i in range(n):
            row = {"key": f"s{i:08d}", "label": LABELS[i % len(LABELS)],
                   "text": f"Sample {i}: a {WORDS[i % 12]} {WORDS[(i // 12) % 12]} thing, number {i * 7919 % n}."}
            if images:
                path = f"images/{i // 10000:03d}/{i}.png"
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)  # distinct as JPEG
                Image.fromarray(pixels).save(folder / path)
                row["image"] = path
            f.write(json.dumps(row) + "\n")
    (folder / "manifest.tmp").rename(manifest)
    return manifest


def _peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def measured(command: list[str]) -> dict:
    """Run a tessera command; its wall time, the driver's and the largest Ray worker's peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"driver": 0, "worker": 0}

    def watch():
        while proc.poll() is None:
            peaks["driver"] = max(peaks["driver"], _peak_rss(proc.pid))
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::"):
                        peaks["worker"] = max(peaks["worker"], _peak_rss(child.pid))
                except psutil.Error:
                    pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - started, "driver_mb": peaks["driver"] / 2**20,
            "worker_mb": peaks["worker"] / 2**20, "stdout": out}


def tessera(*args: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "tessera.workflows", *args, "--workers", str(workers), "--no-progress"]


def sets(**fields) -> list[str]:
    """--set arguments; a__b=v sets a.b."""
    return [arg for field, value in fields.items()
            for arg in ("--set", f"{field.replace('__', '.')}={json.dumps(value)}")]


SHARD = sets(shard__labels=LABELS, shard__image__size=32)


def shard_section(data: Path, n: int, images: bool, workers: int) -> dict:
    corpus = make_corpus(data / f"{'images' if images else 'text'}-{n}", n, images)
    out = corpus.parent / "out"
    shutil.rmtree(out, ignore_errors=True)
    first = measured(tessera("shard", str(corpus), str(out), *SHARD, workers=workers))
    assert json.loads(first["stdout"].splitlines()[-1])["accepted"] == n
    again = measured(tessera("shard", str(corpus), str(out), *SHARD, workers=workers))
    assert json.loads(again["stdout"].splitlines()[-1])["up_to_date"]
    with tempfile.TemporaryDirectory(dir=data) as work:
        job = Path(work) / "refresh.yaml"
        job.write_text(json.dumps({"job": {"manifest": str(corpus), "out": f"{work}/versions"},
                                   "shard": {"labels": LABELS, "image": {"size": 32}},
                                   "embed": {"text": None, "image": None, "audio": None, "video": None}}))
        refresh = measured(tessera("refresh", str(job), workers=workers))
        assert json.loads(refresh["stdout"].splitlines()[-1])["added"] == n
        noop = measured(tessera("refresh", str(job), workers=workers))
        assert json.loads(noop["stdout"].splitlines()[-1])["version"] is None
    return {"shard_s": first["seconds"], "rows_per_s": n / first["seconds"], "driver_mb": first["driver_mb"],
            "worker_mb": first["worker_mb"], "rerun_s": again["seconds"], "refresh_s": refresh["seconds"],
            "noop_refresh_s": noop["seconds"]}


def embed_section(data: Path, n: int, workers: int) -> dict:
    corpus = make_corpus(data / f"images-{n}", n, True)
    out = corpus.parent / "out"
    if not (out / "summary.json").exists():
        measured(tessera("shard", str(corpus), str(out), *SHARD, workers=workers))
    for stale in [*out.glob("*.emb.parquet"), out / "embed-cache", out / "embed-summary.json"]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    settings = sets(embed__text=None, embed__audio=None, embed__video=None, embed__image__image_size=32,
                    embed__image__architecture=TINY_CLIP, embed__actors=workers, embed__cpus_per_actor=1,
                    embed__batch_size=256)
    cold = measured(tessera("embed", str(out), *settings, workers=workers))
    assert json.loads(cold["stdout"].splitlines()[-1])["computed"] > 0.99 * n
    for sidecar in out.glob("*.emb.parquet"):
        sidecar.unlink()
    rebuild = measured(tessera("embed", str(out), *settings, workers=workers))
    assert json.loads(rebuild["stdout"].splitlines()[-1])["computed"] == 0
    return {"embed_s": cold["seconds"], "embed_rows_per_s": n / cold["seconds"], "embed_driver_mb": cold["driver_mb"],
            "embed_worker_mb": cold["worker_mb"], "rebuild_s": rebuild["seconds"],
            "rebuild_driver_mb": rebuild["driver_mb"]}


def synthetic_sidecar(args: tuple[str, str]) -> None:
    """A sidecar of the shard's kept samples with random vectors of realistic widths."""
    root, shard = args
    store = Store(root)
    keys = read_index_part(store, shard, ["key"]).column("key").to_pylist()
    rng = np.random.default_rng(int(shard[6:12]))
    columns = {"key": pa.array(keys, pa.string())}
    for modality, width in WIDTHS.items():
        values = rng.standard_normal(len(keys) * width, dtype=np.float32)
        columns[modality] = pa.FixedSizeListArray.from_arrays(pa.array(values), width)
    pq.write_table(pa.table(columns), str(Path(root) / (shard.removesuffix(".tar") + ".emb.parquet")))


def train_section(data: Path, n: int, workers: int) -> dict:
    corpus = make_corpus(data / f"text-{n}", n, False)
    out = corpus.parent / "out"
    if not (out / "summary.json").exists():
        measured(tessera("shard", str(corpus), str(out), *SHARD, workers=workers))
    shards = committed_shards(Store(str(out)))
    if not (out / "embed-summary.json").exists() or json.loads((out / "embed-summary.json").read_text())["dims"] \
            != WIDTHS:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(synthetic_sidecar, [(str(out), s) for s in shards], chunksize=16))
        (out / "embed-summary.json").write_text(json.dumps({"dims": WIDTHS, "encoders": {m: "synthetic" for m in
                                                                                             WIDTHS}}))
    with tempfile.TemporaryDirectory(dir=data) as run:
        settings = sets(train__workers=2, train__loader_workers=2, train__micro_batch_size=256, train__max_steps=60,
                        train__epochs=1, train__checkpoint_every=10_000, train__model__modalities=list(WIDTHS))
        trained = measured(tessera("train", str(out), "--run-dir", f"{run}/run", *settings, workers=workers))
    return {"train_s": trained["seconds"], "train_driver_mb": trained["driver_mb"],
            "train_worker_mb": trained["worker_mb"]}


def ratio_line(name: str, results: dict[int, dict], field: str, target: float | None = None, linear: bool = False):
    sizes = sorted(n for n in results if field in results[n])
    for small, large in zip(sizes, sizes[1:], strict=False):
        got = results[large][field] / results[small][field]
        bound = large / small * target if linear and target else target
        print(f"  {name} {large}/{small}: x{got:.2f}" + (f" (target <= {bound:.2f})" if bound else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["shard", "embed", "train"], choices=["shard", "embed", "train"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--images-up-to", type=int, default=100_000, help="largest N of the shard section with images")
    ap.add_argument("--embed-sizes", type=int, nargs="+", default=[20_000, 100_000, 1_000_000])
    ap.add_argument("--train-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-scale")
    args = ap.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    if "shard" in args.sections:
        print(f"{'shard':>14} {'wall s':>8} {'rows/s':>8} {'driver MB':>9} {'worker MB':>9} {'re-run s':>8} "
              f"{'refresh s':>9} {'no-op s':>8}")
        for images in (False, True):
            kind = "images" if images else "text"
            for n in args.sizes:
                if images and n > args.images_up_to:
                    continue
                r = report.setdefault(f"shard-{kind}", {})[n] = shard_section(args.data, n, images, args.workers)
                print(f"{kind + '-' + str(n):>14} {r['shard_s']:8.1f} {r['rows_per_s']:8.0f} {r['driver_mb']:9.0f} "
                      f"{r['worker_mb']:9.0f} {r['rerun_s']:8.2f} {r['refresh_s']:9.1f} {r['noop_refresh_s']:8.2f}",
                      flush=True)
    if "embed" in args.sections:
        print(f"{'embed':>14} {'cold s':>8} {'rows/s':>8} {'driver MB':>9} {'worker MB':>9} {'rebuild s':>9} "
              f"{'driver MB':>9}")
        for n in args.embed_sizes:
            r = report.setdefault("embed", {})[n] = embed_section(args.data, n, args.workers)
            print(f"{'images-' + str(n):>14} {r['embed_s']:8.1f} {r['embed_rows_per_s']:8.0f} "
                  f"{r['embed_driver_mb']:9.0f} {r['embed_worker_mb']:9.0f} {r['rebuild_s']:9.1f} "
                  f"{r['rebuild_driver_mb']:9.0f}", flush=True)
    if "train" in args.sections:
        print(f"{'train':>14} {'wall s':>8} {'driver MB':>9} {'largest trainer/loader MB':>26}")
        for n in args.train_sizes:
            r = report.setdefault("train", {})[n] = train_section(args.data, n, args.workers)
            print(f"{'text-' + str(n):>14} {r['train_s']:8.1f} {r['train_driver_mb']:9.0f} "
                  f"{r['train_worker_mb']:26.0f}", flush=True)
    print()
    for kind in ("shard-text", "shard-images"):
        if kind in report:
            print(kind)
            ratio_line("driver RSS", report[kind], "driver_mb", 1.25)
            ratio_line("worker RSS", report[kind], "worker_mb")
            ratio_line("rows/s", report[kind], "rows_per_s")
            top = report[kind][max(report[kind])]
            print(f"  {max(report[kind])} rows: re-run / first run = {top['rerun_s'] / top['shard_s']:.3f}, no-op "
                  f"refresh / first run = {top['noop_refresh_s'] / top['shard_s']:.3f} (targets <= 0.05)")
    if "embed" in report:
        print("embed")
        ratio_line("sidecar rebuild time", report["embed"], "rebuild_s", 1.3, linear=True)
        ratio_line("driver RSS (cold embed)", report["embed"], "embed_driver_mb", 1.25)
        ratio_line("worker RSS (cold embed)", report["embed"], "embed_worker_mb")
        ratio_line("cold embed rows/s", report["embed"], "embed_rows_per_s")
    if "train" in report:
        print("train")
        ratio_line("largest trainer/loader RSS", report["train"], "train_worker_mb", 1.25)
        ratio_line("driver RSS", report["train"], "train_driver_mb", 1.25)
    (args.data / "results.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
