"""Corpus scale: does the shard stage keep its memory flat and its time linear, and do an
up-to-date re-run and a no-op refresh stay cheap, as the corpus grows? Measured in one run.

    python bench/scale.py [--sizes 10000 100000 1000000] [--images-up-to 100000] [--workers 2]

For each N, on synthetic corpora the bench writes itself (`text`: distinct inline captions;
`images`: the same plus a distinct 16x16 PNG per row, stored at 32 px):
  shard    `tessera shard` into an empty OUT: wall time, rows/s, the driver's peak RSS and the
           largest Ray worker's peak RSS (VmHWM from /proc, read while they run)
  re-run   the same command on the complete OUT
  refresh  `tessera refresh` into another OUT twice: the first makes version 1, the second
           finds nothing new (what a scheduled refresh of an unchanged corpus costs)
Prints one line per corpus, then the ratios the targets are stated in.
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
from pathlib import Path

import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LABELS = ["person", "animal", "object", "science", "texture", "document", "scene"]
WORDS = ["red", "green", "blue", "small", "large", "quiet", "loud", "old", "new", "bright", "dark", "round"]


def make_corpus(folder: Path, n: int, images: bool) -> Path:
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    with manifest.open("w") as f:
        for i in range(n):
            row = {"key": f"s{i:08d}", "label": LABELS[i % len(LABELS)],
                   "text": f"Sample {i}: a {WORDS[i % 12]} {WORDS[(i // 12) % 12]} thing, number {i * 7919 % n}."}
            if images:
                path = f"images/{i // 10000:03d}/{i}.png"
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                pixels = bytes((i >> shift) & 255 for shift in (0, 8, 16)) * 256
                Image.frombytes("RGB", (16, 16), pixels).save(folder / path)
                row["image"] = path
            f.write(json.dumps(row) + "\n")
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
    return {"seconds": time.perf_counter() - started, **peaks, "stdout": out}


def tessera(*args: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "workflows", *args, "--workers", str(workers), "--no-progress"]


def run(corpus: Path, work: Path, n: int, images: bool, workers: int) -> dict:
    settings = ["--set", f"shard.labels={json.dumps(LABELS)}", "--set", "shard.image.size=32"]
    out = work / "out"
    first = measured(tessera("shard", str(corpus), str(out), *settings, workers=workers))
    summary = json.loads(first["stdout"].splitlines()[-1])
    assert summary["accepted"] == n, summary
    again = measured(tessera("shard", str(corpus), str(out), *settings, workers=workers))
    assert json.loads(again["stdout"].splitlines()[-1])["up_to_date"]
    shutil.rmtree(out)
    job = work / "refresh.yaml"
    job.write_text(json.dumps({"job": {"manifest": str(corpus), "out": str(work / "versions")},
                               "shard": {"labels": LABELS, "image": {"size": 32}},
                               "embed": {"text": None, "image": None, "audio": None, "video": None}}))
    refresh = measured(tessera("refresh", str(job), workers=workers))
    assert json.loads(refresh["stdout"].splitlines()[-1])["added"] == n
    noop = measured(tessera("refresh", str(job), workers=workers))
    assert json.loads(noop["stdout"].splitlines()[-1])["version"] is None
    shutil.rmtree(work / "versions")
    return {"rows": n, "images": images, "shard_s": first["seconds"], "rows_per_s": n / first["seconds"],
            "driver_mb": first["driver"] / 2**20, "worker_mb": first["worker"] / 2**20,
            "rerun_s": again["seconds"], "refresh_s": refresh["seconds"], "noop_refresh_s": noop["seconds"],
            "refresh_driver_mb": refresh["driver"] / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--images-up-to", type=int, default=100_000, help="largest N of the corpus with images")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-scale")
    args = ap.parse_args()
    results = []
    print(f"{'corpus':>14} {'shard s':>8} {'rows/s':>8} {'driver MB':>9} {'worker MB':>9} {'re-run s':>8} "
          f"{'refresh s':>9} {'no-op s':>8}")
    for images in (False, True):
        for n in args.sizes:
            if images and n > args.images_up_to:
                continue
            name = f"{'images' if images else 'text'}-{n}"
            corpus = make_corpus(args.data / name, n, images)
            with tempfile.TemporaryDirectory(dir=args.data) as work:
                r = run(corpus, Path(work), n, images, args.workers)
            results.append(r)
            print(f"{name:>14} {r['shard_s']:8.1f} {r['rows_per_s']:8.0f} {r['driver_mb']:9.0f} {r['worker_mb']:9.0f} "
                  f"{r['rerun_s']:8.2f} {r['refresh_s']:9.1f} {r['noop_refresh_s']:8.2f}", flush=True)
    print()
    for images in (False, True):
        mine = {r["rows"]: r for r in results if r["images"] == images}
        kind = "images" if images else "text"
        for small, large in zip(sorted(mine), sorted(mine)[1:], strict=False):
            a, b = mine[small], mine[large]
            print(f"{kind} {large}/{small}: driver RSS x{b['driver_mb'] / a['driver_mb']:.2f} (target <= 1.25), "
                  f"worker RSS x{b['worker_mb'] / a['worker_mb']:.2f}, rows/s x{b['rows_per_s'] / a['rows_per_s']:.2f} "
                  f"(target >= 0.9)")
        if mine:
            top = mine[max(mine)]
            print(f"{kind} {max(mine)}: re-run / first run = {top['rerun_s'] / top['shard_s']:.3f}, no-op refresh / "
                  f"first run = {top['noop_refresh_s'] / top['shard_s']:.3f} (targets <= 0.05)")
    (args.data / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
