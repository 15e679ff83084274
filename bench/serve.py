"""`tessera serve` under load, against what a user writes by hand, in one run on this machine.

    python bench/serve.py [--seconds 10] [--levels 1,8,32,64]

Trains and exports (with the encoder bundle) a model on the mini corpus, then sends closed-loop
clients (each posts one sample, waits for the answer, posts the next) at each concurrency level
for SECONDS, the mini corpus's samples that have text, an image and audio, to
  (a) `tessera serve` (Ray Serve, one replica of 1 CPU, batches waiting up to 50 ms),
  (b) a FastAPI + uvicorn app calling the same Predictor once per request (this file, --handwritten),
  (c) `tessera serve --bundle` (the encoders under onnxruntime, no torch),
each started by the bench as its own process on this machine. Reports requests/s and p50 / p99
latency per level, the batch sizes (a) reached, a/b at 32, and the ceiling: `tessera predict`'s
offline samples/s on the same samples (torch and bundle), measured in the same run, with (a)'s
and (c)'s samples/s at the highest level as a fraction of it."""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from predict import mini_export  # noqa: E402
from shard import MINI  # noqa: E402

from tessera.core.storage import Store  # noqa: E402
from tessera.train.config import ExportConfig  # noqa: E402
from tessera.workflows.predict import Predictor, predict_inputs  # noqa: E402

MEDIA = ("image", "audio")


def mini_samples() -> list[dict]:
    """The mini corpus's rows with text, image and audio (absolute paths), as manifest rows."""
    rows = [json.loads(line) for line in (MINI / "manifest.jsonl").open()]
    rows = [r for r in rows if r.get("text") and all(f in r for f in MEDIA)]
    return [{"key": r["key"], "text": r["text"], **{f: str(MINI / r[f]) for f in MEDIA}} for r in rows]


def request_body(row: dict) -> bytes:
    sample = {"key": row["key"], "text": row["text"],
              **{f: base64.b64encode(Path(row[f]).read_bytes()).decode() for f in MEDIA}}
    return json.dumps({"samples": [sample]}).encode()


def handwritten_app(model: str):
    """What a user writes by hand: FastAPI, the Predictor called once per request."""
    from fastapi import FastAPI

    from tessera.preprocess.manifest import parse_row

    predictor = Predictor(Store(model))
    app = FastAPI()

    @app.post("/predict")
    def predict(payload: dict) -> dict:
        prepared = []
        for sample in payload["samples"]:
            raw = {f: base64.b64decode(sample[f]) for f in MEDIA if f in sample}
            row = parse_row({"key": sample["key"], "text": sample["text"], **{f: f"/request/{f}" for f in raw}},
                            1, "/", predictor.shard_cfg)
            prepared.append((row, predictor.prepare(row, raw)))
        return {"results": predictor.score_prepared(prepared)}

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    return app


def start(command: list[str], port: int) -> subprocess.Popen:
    log = open(Path(tempfile.gettempdir()) / f"bench-serve-{port}.log", "w")  # noqa: SIM115 - the server's
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_ADDRESS": ""})
    import requests

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command} exited {proc.returncode}: see {log.name}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"{command} not ready in 300 s: see {log.name}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """CLIENTS threads, each posting one body after another for SECONDS; latencies of the 200s."""
    import numpy as np
    import requests

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        session = requests.Session()
        n = i
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            response = session.post(url, data=bodies[n % len(bodies)], headers={"content-type": "application/json"},
                                    timeout=120)
            took = time.perf_counter() - t0
            with lock:
                if response.status_code == 200:
                    latencies.append(took)
                else:
                    errors[0] += 1
            n += clients

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests_per_s": len(latencies) / elapsed, "errors": errors[0],
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}


def batch_counts(url: str) -> tuple[float, float]:
    """(samples, model calls) so far, from the replica's tessera_batch_size histogram."""
    import requests

    values = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("tessera_batch_size_sum", "tessera_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("tessera_batch_size_sum", 0.0), values.get("tessera_batch_size_count", 0.0)


def offline(model: Path, manifest: Path, bundle: bool) -> float:
    """`tessera predict`'s samples/s on the manifest (a warm-up pass first)."""
    predictor = Predictor(Store(str(model)), bundle=bundle)
    list(predict_inputs(predictor, [str(manifest)]))
    t0 = time.perf_counter()
    n = sum(1 for r in predict_inputs(predictor, [str(manifest)]) if not r.get("rejected"))
    return n / (time.perf_counter() - t0)


def levels_against(name: str, command: list[str], port: int, bodies: list[bytes], levels: list[int],
                   seconds: float, batched: bool) -> list[dict]:
    proc = start(command, port)
    url = f"http://127.0.0.1:{port}"
    out = []
    try:
        closed_loop(f"{url}/predict", bodies, 4, 3)  # warm-up
        for clients in levels:
            before = batch_counts(url) if batched else None
            result = closed_loop(f"{url}/predict", bodies, clients, seconds)
            if batched:
                after = batch_counts(url)
                result["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            out.append({"server": name, **result})
            print(json.dumps(out[-1]), flush=True)
    finally:
        stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--handwritten", metavar="EXPORT", help=argparse.SUPPRESS)  # serve (b): the bench's own child
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-serve",
                    help="where the trained export is kept between runs (made when missing)")
    args = ap.parse_args()
    if args.handwritten:
        import uvicorn

        uvicorn.run(handwritten_app(args.handwritten), host="127.0.0.1", port=args.port, log_level="warning")
        return
    levels = [int(x) for x in args.levels.split(",")]
    rows = mini_samples()
    bodies = [request_body(r) for r in rows]
    model = args.data / "model"
    if not (model / "export.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            mini_export(Path(tmp), model, ExportConfig(bundle=True))
    exported = json.loads((model / "export.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "samples.jsonl"
        manifest.write_text("".join(json.dumps({**r, "key": f"{r['key']}-{i}"}) + "\n"
                                    for i in range(4) for r in rows))  # 4 x the samples: a longer pass
        ceiling = {"torch": offline(model, manifest, False), "bundle": offline(model, manifest, True)}
        print(json.dumps({"offline_samples_per_s": ceiling}), flush=True)
        serve = [sys.executable, "-m", "tessera.workflows", "serve", str(model), "--port", str(args.port),
                 "--no-progress", "--set", "serve.batch_wait_ms=50"]
        results = levels_against("tessera serve", serve, args.port, bodies, levels, args.seconds, True)
        results += levels_against("handwritten", [sys.executable, __file__, "--handwritten", str(model), "--port",
                                                  str(args.port + 1)], args.port + 1, bodies, levels, args.seconds,
                                  False)
        results += levels_against("tessera serve --bundle", [*serve, "--bundle"], args.port, bodies,
                                  [32, levels[-1]], args.seconds, True)
    by = {(r["server"], r["clients"]): r for r in results}
    print(f"\n{len(rows)} mini samples (text + image + audio), one per request, closed loop, {args.seconds:.0f} s "
          f"per level, 2 cores; encoders: text MiniLM (real), CLIP and wav2vec2 tiny random")
    print(f"{'server':<24}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'errors':>7}")
    for r in results:
        batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
        print(f"{r['server']:<24}{r['clients']:>8}{r['requests_per_s']:>9.1f}{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}"
              f"{batch:>7}{r['errors']:>7}")
    top = levels[-1]
    if 32 in levels:
        a, b = by[("tessera serve", 32)], by[("handwritten", 32)]
        print(f"a/b at 32 clients: x{a['requests_per_s'] / b['requests_per_s']:.2f} requests/s (target >= 2)")
    print(f"offline `tessera predict`: torch {ceiling['torch']:.1f} samples/s, bundle {ceiling['bundle']:.1f} "
          f"samples/s (bundle/torch x{ceiling['bundle'] / ceiling['torch']:.2f})")
    served = {kind: by[(server, top)]["requests_per_s"] / ceiling[kind]
              for kind, server in (("torch", "tessera serve"), ("bundle", "tessera serve --bundle"))}
    print(f"serving at {top} clients / offline: torch {served['torch']:.2f}, bundle {served['bundle']:.2f} "
          "(target >= 0.8)")
    sizes = {m: e["bytes"] for m, e in exported.bundle["encoders"].items()}
    print(f"bundle graphs (bytes fp32 / int8): {sizes}")


if __name__ == "__main__":
    main()
