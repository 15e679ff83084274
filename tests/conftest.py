"""Shared fixtures: the shared corpora, one session-wide Ray, the label set."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESSERA = [sys.executable, "-m", "tessera.workflows"]  # the CLI, as a process of its own
SHARED = Path(os.environ.get("TESSERA_SHARED", REPO.parent / "shared")) / "corpus"
MINI = SHARED / "mini"
DIRTY = SHARED / "dirty"
LABELS = ("person", "animal", "object", "science", "texture", "document", "scene")


def pytest_configure(config):
    if not (MINI / "manifest.jsonl").exists():
        raise pytest.UsageError(f"the shared corpus is missing at {SHARED} (set TESSERA_SHARED)")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray with 2 CPUs for every test that needs it: starting Ray is slow."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Targets the tests add to the mini corpus besides its labels (multi-task training): whether a
# sample has audio (left out of every 7th row, so that some samples lack it), which of
# image/audio/video it has, and its caption's word count.
MINI_TARGETS = [{"field": "has_audio", "kind": "classification", "labels": ["no", "yes"]},
                {"field": "media", "kind": "multilabel", "labels": ["audio", "image", "video"]},
                {"field": "words", "kind": "regression"}]
MINI_TASKS = [{"name": "label"}, {"name": "has_audio", "weight": 0.5}, {"name": "media"}, {"name": "words"}]


def with_targets(row: dict, line: int) -> dict:
    row = {**row, "media": sorted(m for m in ("audio", "image", "video") if m in row)}
    if line % 7:
        row["has_audio"] = "yes" if "audio" in row else "no"
    if row.get("text"):
        row["words"] = len(row["text"].split())
    return row


@pytest.fixture(scope="session")
def embedded_mini(ray_session, tmp_path_factory):
    """The mini corpus with MINI_TARGETS, sharded (3 shards) and embedded, as training reads it."""
    import json

    from tessera.core.storage import Store
    from tessera.features.config import EmbedConfig
    from tessera.features.stage import run_embed_stage
    from tessera.preprocess.config import ShardConfig
    from tessera.preprocess.stage import run_shard_stage

    out = tmp_path_factory.mktemp("train-mini")
    manifest = out.parent / f"{out.name}-manifest.jsonl"
    manifest.write_text("".join(json.dumps(with_targets(json.loads(line), n)) + "\n"
                                for n, line in enumerate(mini_manifest_lines(None))))
    cfg = ShardConfig(labels=LABELS, samples_per_shard=16, targets=MINI_TARGETS, inputs={"allow": [str(MINI)]})
    run_shard_stage(str(manifest), Store(str(out)), cfg, progress=False)
    run_embed_stage(Store(str(out)), EmbedConfig(), progress=False)
    return out


@pytest.fixture(scope="session")
def trained_mini(embedded_mini, tmp_path_factory) -> Path:
    """A run of MINI_TASKS trained on the embedded mini corpus with a large validation split
    (~40%), for evaluation, export and prediction."""
    from tessera.core.storage import Store
    from tessera.train.config import TrainConfig
    from tessera.train.stage import run_train_stage

    run = tmp_path_factory.mktemp("trained-mini")
    run_train_stage(Store(str(embedded_mini)), Store(str(run)), TrainConfig(
        workers=2, micro_batch_size=4, epochs=8, warmup_steps=2, lr=3e-3, val_fraction=0.4, loader_workers=0,
        checkpoint_every=1000, tasks=MINI_TASKS))
    return run


@pytest.fixture(scope="session")
def exported_mini(trained_mini, tmp_path_factory):
    """The multi-task mini model exported (with the encoder bundle), and evaluation's scores per (key, task)."""
    import pyarrow.parquet as pq

    from tessera.core.storage import Store
    from tessera.train.config import ExportConfig
    from tessera.train.evaluate import evaluate_run
    from tessera.train.export import export_run

    out = tmp_path_factory.mktemp("model")
    export_run(Store(str(trained_mini)), Store(str(out)), ExportConfig(bundle=True))
    evaluate_run(Store(str(trained_mini)))
    rows = pq.read_table(trained_mini / "eval-predictions.parquet").to_pylist()
    evaluated = {}
    for r in rows:
        if r["set"] == "val":
            evaluated.setdefault(r["key"], {})[r["task"]] = r["scores"]
    return out, evaluated


def mini_manifest_lines(stop: int | None, start: int = 0) -> list[str]:
    """Rows start..stop-1 of the mini manifest with absolute paths, for manifests written elsewhere
    (whose shard config must then allow MINI: shard.inputs.allow)."""
    import json

    rows = [json.loads(line) for line in (MINI / "manifest.jsonl").open()][start:stop]
    for row in rows:
        for field in ("image", "audio", "video"):
            if field in row:
                row[field] = str(MINI / row[field])
    return [json.dumps(row) for row in rows]


def index_rows(out) -> list[dict]:
    """The kept samples of a local shard output (duplicates excluded), as records."""
    from tessera.core.storage import Store
    from tessera.preprocess.layout import INDEX_SCHEMA, read_index

    return read_index(Store(str(out)), INDEX_SCHEMA.names).to_pylist()


def reject_rows(out) -> list[dict]:
    """Every reject of a local shard output (the shard tasks' and the dedup pass's)."""
    from tessera.core.storage import Store
    from tessera.preprocess.layout import reject_batches

    return [r for batch in reject_batches(Store(str(out))) for r in batch.to_pylist()]


def terminated(proc) -> None:
    """SIGTERM a server process and wait for it to end (killed after 90 s)."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_options():
    """A real S3-compatible server (moto's server mode) on loopback; storage options by protocol."""
    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    yield {"s3": options}
    proc.terminate()
    proc.wait()


class FlakyProxy:
    """An HTTP proxy in front of the S3 server that fails requests, in turn with a 503 SlowDown
    answer and with the connection dropped before any answer: while `outages` = (every_s,
    down_s) is set, every request in the first DOWN_S seconds of each EVERY_S (an outage
    outlasts s3fs's own retries, five in about 2 s, so tessera's have to carry the calls over
    it); while `rate` is set, that share of all requests, at random (seeded). botocore's own
    retries are off (OPTIONS)."""

    SLOW_DOWN = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                 b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, upstream: str, credentials: dict):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        proxy, host = self, urlsplit(upstream)
        self.outages: tuple[float, float] | None = None
        self.rate, self.requests = 0.0, 0
        self.started, self.faults, self.lock = time.monotonic(), 0, threading.Lock()
        self.random = __import__("random").Random(0)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""
                while True:  # forwarded as it came, chunk framing included
                    line = self.rfile.readline()
                    size = int(line.split(b";")[0], 16)
                    raw += line + self.rfile.read(size + 2)
                    if size == 0:
                        return raw

            def forward(self) -> None:
                body = self.body()
                fault = proxy.next_fault()
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "slow-down":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(b"" if self.command == "HEAD" else proxy.SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that hung up on a dropped connection: what the proxy is for

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.options = {"s3": {**credentials,
                               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{self.server.server_port}"},
                               "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}}

    def next_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.outages is not None:
                every, down = self.outages
                failing = (time.monotonic() - self.started) % every < down
            else:
                failing = self.rate > 0 and self.random.random() < self.rate
            if not failing:
                return None
            self.faults += 1
            return ("slow-down", "drop")[self.faults % 2]


@pytest.fixture(scope="session")
def flaky_s3(s3_options):
    options = s3_options["s3"]
    proxy = FlakyProxy(options["client_kwargs"]["endpoint_url"], {k: options[k] for k in ("key", "secret")})
    yield proxy
    proxy.server.shutdown()


def train_killed_at_first_checkpoint(shards: Path, run: Path, config: Path, timeout: float = 400) -> int:
    """`tessera train` on SHARDS into RUN, SIGKILLed (its whole process group) as soon as its
    first checkpoint is committed; the step it was committed at."""
    proc = subprocess.Popen([*TESSERA, "train", str(shards), "--run-dir", str(run), "--config", str(config),
                             "--no-progress"], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return int(latest.read_text().removeprefix("step-"))
