"""The edge runtime (`tessera serve --bundle --runtime edge`: one process, no Ray, no torch)
against `tessera serve --bundle` on Ray Serve and `tessera serve` (torch), in one run.

    python bench/edge.py [--seconds 10]

On the mini corpus's export (made by bench/serve.py's helpers when missing), each server
started by the bench as its own process: cold start to a ready /readyz, resident memory after
warm-up (the edge process; on Ray the replica's), p50 / p99 latency at 1 client and
requests/s at 8 and 32 closed-loop clients (one sample of text + image + audio per request).
Also the size of `pip install '.[edge]'` in a fresh venv against the full install, and the
cascade with a distilled student at the edge and its teacher in the cloud: as `tessera
evaluate --cascade` computes it, and measured through the running services (the student's
bundle on the edge runtime alone, the teacher on Ray Serve alone, and the hybrid at the
recommended threshold): accuracy on the validation rows, mean latency, share forwarded."""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from predict import mini_export  # noqa: E402
from serve import closed_loop, mini_samples, request_body, start, stop  # noqa: E402
from shard import LABELS, MINI  # noqa: E402

from tessera.core.storage import Store  # noqa: E402
from tessera.features.config import EmbedConfig  # noqa: E402
from tessera.features.stage import run_embed_stage  # noqa: E402
from tessera.preprocess.config import ShardConfig  # noqa: E402
from tessera.preprocess.stage import run_shard_stage  # noqa: E402
from tessera.train.config import ExportConfig, ModelConfig, TrainConfig  # noqa: E402
from tessera.train.evaluate import EvalStage  # noqa: E402
from tessera.train.stage import run_train_stage  # noqa: E402


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def edge_install_mb() -> tuple[float, int, float]:
    """(MB, packages) of `pip install '.[edge]'` into a fresh venv, with this repo's constraints;
    and the MB of the environment this bench runs in (the full install)."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "edge"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-c", str(REPO / "constraints.txt"),
                        f"{REPO}[edge]"], check=True, capture_output=True)
        listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json"], check=True, capture_output=True,
                                text=True).stdout
        return folder_mb(venv), len(json.loads(listed)), folder_mb(Path(sys.prefix))


def cascade_runs(scratch: Path) -> tuple[dict, Path, Path, list[dict]]:
    """A teacher (hidden 256, 3 blocks) and a student distilled from it (32, 1) on the mini
    corpus (half its keys held out, so the validation split is not a handful): eval.json's
    cascade of the student in front of the teacher (train/cascade.py, tolerance 0.02), the
    teacher exported, the student exported with its bundle, and the validation rows."""
    import ray

    from tessera.core.engine import execute
    from tessera.core.lease import DEFAULT_LEASE
    from tessera.train.export import export_run

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    shards, teacher, student = scratch / "shards", scratch / "teacher", scratch / "student"
    run_shard_stage(str(MINI / "manifest.jsonl"), Store(str(shards)), ShardConfig(labels=LABELS), progress=False)
    run_embed_stage(Store(str(shards)), EmbedConfig(), progress=False)
    common = dict(epochs=8, micro_batch_size=4, loader_workers=0, val_fraction=0.5)
    run_train_stage(Store(str(shards)), Store(str(teacher)),
                    TrainConfig(model=ModelConfig(hidden=256, blocks=3), **common))
    run_train_stage(Store(str(shards)), Store(str(student)), TrainConfig(
        model=ModelConfig(hidden=32, blocks=1), distill_from=str(teacher), distill={"alpha": 0.7, "temperature": 2.0},
        **common))
    ray.shutdown()
    execute(EvalStage(Store(str(teacher))), DEFAULT_LEASE, progress=False)
    chosen = execute(EvalStage(Store(str(student)), cascade=Store(str(teacher)), tolerance=0.02), DEFAULT_LEASE,
                     progress=False).cascade
    export_run(Store(str(teacher)), Store(str(scratch / "teacher-export")), ExportConfig())
    export_run(Store(str(student)), Store(str(scratch / "student-export")), ExportConfig(bundle=True))
    val = {r["key"] for r in Store(str(student)).read_parquet("eval-predictions.parquet").to_pylist()
           if r["set"] == "val" and r["task"] == "label" and r["target"] is not None}
    rows = [r for r in map(json.loads, (MINI / "manifest.jsonl").open()) if r["key"] in val]
    return chosen, scratch / "teacher-export", scratch / "student-export", rows


def _body(row: dict) -> bytes:
    """A manifest row as a /predict request of one sample, its files inline."""
    sample = {"key": row["key"], **({"text": row["text"]} if row.get("text") else {})}
    for field in ("image", "audio", "video"):
        if field in row:
            sample[field] = base64.b64encode((MINI / row[field]).read_bytes()).decode()
    return json.dumps({"samples": [sample]}).encode()


def through(url: str, rows: list[dict]) -> tuple[float, float, list[dict]]:
    """(accuracy, mean ms, results): each row posted alone, one after another (1 client)."""
    import requests

    session, results, took = requests.Session(), [], []
    for row in rows:
        t0 = time.perf_counter()
        result = session.post(f"{url}/predict", data=_body(row), headers={"content-type": "application/json"},
                              timeout=120).json()["results"][0]
        took.append(time.perf_counter() - t0)
        results.append(result)
    right = [r.get("predictions", {}).get("label") == row["label"] for r, row in zip(results, rows, strict=True)]
    return sum(right) / len(rows), 1000 * sum(took) / len(took), results


def measured_cascade(teacher: Path, student: Path, rows: list[dict], threshold: float, port: int) -> dict:
    """The cascade through running services: the teacher on Ray Serve (the cloud), the student's
    bundle on the edge runtime alone and then with serve.fallback at THRESHOLD (the hybrid)."""
    base = [sys.executable, "-m", "tessera.workflows", "serve", "--no-progress"]
    cloud = start([*base, str(teacher), "--port", str(port)], port)
    cloud_url = f"http://127.0.0.1:{port}"
    out = {}
    try:
        through(cloud_url, rows[:4])  # warm-up
        out["cloud"] = through(cloud_url, rows)[:2]
        for name, extra in (("edge", []), ("hybrid", ["--set", f'serve.fallback.url="{cloud_url}"', "--set",
                                                      f"serve.fallback.min_confidence={threshold}"])):
            edge = start([*base, str(student), "--bundle", "--runtime", "edge", "--port", str(port + 1), *extra],
                         port + 1)
            try:
                through(f"http://127.0.0.1:{port + 1}", rows[:4])
                accuracy, ms, results = through(f"http://127.0.0.1:{port + 1}", rows)
                out[name] = (accuracy, ms, sum(r.get("served_by") == "cloud" for r in results) / len(rows))
            finally:
                stop(edge)
    finally:
        stop(cloud)
    return out


def measure(name: str, command: list[str], port: int, bodies: list[bytes], seconds: float,
            replica: str | None) -> dict:
    """Cold start, RSS after warm-up, latency at 1 client, req/s at 8 and 32 clients."""
    t0 = time.monotonic()
    proc = start(command, port)
    cold = time.monotonic() - t0
    url = f"http://127.0.0.1:{port}/predict"
    try:
        closed_loop(url, bodies, 4, 3)  # warm-up
        processes = [proc_info for proc_info in psutil.Process(proc.pid).children(recursive=True)
                     if replica is not None and replica in " ".join(proc_info.cmdline())] \
            if replica else [psutil.Process(proc.pid)]
        rss = sum(p.memory_info().rss for p in processes)
        levels = {clients: closed_loop(url, bodies, clients, seconds) for clients in (1, 8, 32)}
    finally:
        stop(proc)
    result = {"server": name, "cold_start_s": cold, "rss_mb": rss / 2**20,
              "p50_ms": levels[1]["p50_ms"], "p99_ms": levels[1]["p99_ms"],
              "rps_8": levels[8]["requests_per_s"], "rps_32": levels[32]["requests_per_s"],
              "errors": sum(level["errors"] for level in levels.values())}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8120)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-serve",
                    help="where the trained export is kept between runs (made when missing)")
    args = ap.parse_args()
    model = args.data / "model"
    if not (model / "export.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            mini_export(Path(tmp), model, ExportConfig(bundle=True))
    bodies = [request_body(r) for r in mini_samples()]
    with tempfile.TemporaryDirectory() as tmp:
        chosen, teacher, student, val_rows = cascade_runs(Path(tmp))
        hybrid = measured_cascade(teacher, student, val_rows, chosen["recommended"]["threshold"], args.port + 10)
    serve = [sys.executable, "-m", "tessera.workflows", "serve", str(model), "--no-progress"]
    results = [
        measure("edge (--runtime edge)", [*serve, "--bundle", "--runtime", "edge", "--port", str(args.port)],
                args.port, bodies, args.seconds, None),
        measure("Ray Serve --bundle", [*serve, "--bundle", "--port", str(args.port + 1)], args.port + 1, bodies,
                args.seconds, "ServeReplica:tessera"),
        measure("Ray Serve (torch)", [*serve, "--port", str(args.port + 2)], args.port + 2, bodies, args.seconds,
                "ServeReplica:tessera"),
    ]
    edge_mb, packages, full_mb = edge_install_mb()
    best = chosen["recommended"]
    print(f"\n{len(bodies)} mini samples (text + image + audio), one per request, closed loop, {args.seconds:.0f} s "
          "per level, 2 cores; fp32 export")
    print(f"{'server':<24}{'cold s':>8}{'RSS MB':>8}{'p50 ms':>8}{'p99 ms':>8}{'req/s 8':>9}{'req/s 32':>9}{'err':>5}")
    for r in results:
        print(f"{r['server']:<24}{r['cold_start_s']:>8.1f}{r['rss_mb']:>8.0f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
              f"{r['rps_8']:>9.1f}{r['rps_32']:>9.1f}{r['errors']:>5}")
    print("(RSS: the edge process; on Ray the replica's process alone, without Ray's own)")
    print(f"edge: cold start {results[0]['cold_start_s']:.1f} s (goal <= 5), RSS {results[0]['rss_mb']:.0f} MB "
          f"(goal <= 400)")
    print(f"pip install '.[edge]' in a fresh venv: {edge_mb:.0f} MB, {packages} packages (goal <= 400 MB); the full "
          f"install this bench runs in: {full_mb:.0f} MB")
    print(f"cascade on the mini validation split ({chosen['samples']} samples; edge: the distilled student, cloud: "
          f"its teacher), from the evaluations: edge alone {chosen['edge_accuracy']:.3f}, cloud alone "
          f"{chosen['cloud_accuracy']:.3f}; min_confidence {best['threshold']:.2f} (within 0.02 of the cloud): "
          f"accuracy {best['accuracy']:.3f}, {best['forwarded']:.0%} forwarded")
    print("the same through running services, each sample its own request, 1 client (cloud: Ray Serve, torch; "
          "edge: the student's bundle on the edge runtime):")
    for name in ("edge", "cloud", "hybrid"):
        accuracy, ms = hybrid[name][:2]
        share = f", {hybrid[name][2]:.0%} forwarded" if name == "hybrid" else ""
        print(f"  {name:<7} accuracy {accuracy:.3f}, mean latency {ms:.1f} ms{share}")


if __name__ == "__main__":
    main()
