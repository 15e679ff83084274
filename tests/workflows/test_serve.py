"""tessera serve: a real HTTP server (Ray Serve) on loopback and a real HTTP client. Its answers
are tessera predict's on the same inputs; bad samples get their reasons, bad requests their
status, and the service goes on answering."""

import base64
import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from tessera.core.storage import Store
from tessera.workflows.predict import Predictor, predict_inputs
from tests.conftest import DIRTY, REPO, TESSERA, free_port, mini_manifest_lines, terminated

pytestmark = pytest.mark.slow  # (see README: the test tiers)

MAX_BYTES = 8_000_000


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def as_request(row: dict) -> dict:
    """A manifest row as a /predict sample: its files inline."""
    sample = {"key": row["key"], "text": row.get("text")}
    for field in ("image", "audio", "video"):
        if field in row:
            sample[field] = _b64(row[field])
    return {k: v for k, v in sample.items() if v is not None}


def assert_same(got: dict, want: dict) -> None:
    """The same predictions (regression values to float32 precision: batches differ) and scores."""
    assert set(got["predictions"]) == set(want["predictions"])
    for task, value in want["predictions"].items():
        if isinstance(value, float):
            assert abs(got["predictions"][task] - value) < 1e-4 * max(1.0, abs(value)), task
        else:
            assert got["predictions"][task] == value, task
    for task, scores in want["scores"].items():
        assert max(abs(got["scores"][task][k] - v) for k, v in scores.items()) < 1e-5, task


READ_TIMEOUT_S, MAX_ONGOING, STALLED = 3, 16, 40


def stall(port: int, n: int) -> list[socket.socket]:
    """N connections that send a request's headers and the start of its body, then nothing."""
    sockets = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=4 * READ_TIMEOUT_S + 20)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: tessera\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"samples\": [")
        sockets.append(s)
    return sockets


def started(model, port: int, *options: str, tessera: tuple[str, ...] = tuple(TESSERA)) -> subprocess.Popen:
    """`tessera serve MODEL` (TESSERA: the CLI command) on PORT, once /readyz says so."""
    proc = subprocess.Popen([*tessera, "serve", str(model), "--port", str(port),
                             "--workers", "2", "--max-batch-size", "16", "--set",
                             f"serve.max_request_bytes={MAX_BYTES}", "--no-progress", *options],
                            cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:  # not listening yet, or not routing yet
            pass
        time.sleep(1)
    proc.kill()
    raise AssertionError("tessera serve was not ready in 300 s")


def test_the_service_answers_as_predict_does_and_survives_bad_requests(exported_mini, tmp_path):
    model, _ = exported_mini
    port = free_port()
    proc = started(model, port, "--set", f"serve.read_timeout_s={READ_TIMEOUT_S}", "--set",
                   f"serve.max_ongoing_requests={MAX_ONGOING}")
    url = f"http://127.0.0.1:{port}"
    try:
        rows = [json.loads(line) for line in mini_manifest_lines(12)]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        expected = {r["key"]: r for r in predict_inputs(Predictor(Store(str(model))), [str(tmp_path / "rows.jsonl")])}

        got = requests.post(f"{url}/predict", json={"samples": [as_request(r) for r in rows]}, timeout=120)
        assert got.status_code == 200, got.text
        answer = got.json()
        assert answer["model"]["variant"] == "fp32" and answer["model"]["tasks"]
        assert [r["key"] for r in answer["results"]] == [r["key"] for r in rows]  # one each, in order
        for result in answer["results"]:
            assert_same(result, expected[result["key"]])

        # one sample as a form: files and fields
        row = next(r for r in rows if {"image", "audio"} <= set(r))
        files = {f: (Path(row[f]).name, Path(row[f]).read_bytes()) for f in ("image", "audio", "video") if f in row}
        form = requests.post(f"{url}/predict", data={"text": row["text"], "key": row["key"]}, files=files, timeout=60)
        assert form.status_code == 200, form.text
        assert_same(form.json()["results"][0], expected[row["key"]])

        # the dirty corpus in one request: each input its reason (the one predict gives), the good ones
        # their prediction; rows whose files are missing or that are not JSON objects cannot be sent inline
        dirty = []
        for line in (DIRTY / "manifest.jsonl").read_text().splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            # what a request carries: key, text and media (no labels, no text files)
            sample = {f: obj[f] for f in ("key", "text", "image", "audio", "video") if f in obj}
            media = [f for f in ("image", "audio", "video") if f in sample]
            if isinstance(sample.get("key"), str) and sample["key"] and \
                    all(isinstance(v, str) for v in sample.values()) and \
                    all((DIRTY / sample[f]).exists() for f in media) and len(sample) > 1:
                dirty.append({**sample, **{f: str(DIRTY / sample[f]) for f in media}})
        (tmp_path / "dirty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dirty))
        by_predict = list(predict_inputs(Predictor(Store(str(model))), [str(tmp_path / "dirty.jsonl")]))
        answered = requests.post(f"{url}/predict", json={"samples": [as_request(r) for r in dirty]}, timeout=120)
        assert answered.status_code == 200, answered.text
        results = answered.json()["results"]
        assert len(results) == len(dirty) == len(by_predict) > 8
        errors = [r for r in results if "error" in r]
        assert errors and len(errors) < len(results)
        for result, mine in zip(results, by_predict, strict=True):
            assert result.get("error") == mine.get("reason"), (result, mine)

        # bad requests: each its status, and the next request is answered
        small = {"samples": [as_request(rows[0])]}
        for status, call in [
            (422, lambda: requests.post(f"{url}/predict", data=b"{not json", headers={"content-type":
                                                                                       "application/json"})),
            (422, lambda: requests.post(f"{url}/predict", json={"samples": [{"text": 5}]})),
            (422, lambda: requests.post(f"{url}/predict", json={"samples": [{"image": "x", "path": "/etc/passwd"}]})),
            (413, lambda: requests.post(f"{url}/predict", data=b"x" * (3 * MAX_BYTES),
                                        headers={"content-type": "application/json"})),
            (413, lambda: requests.post(f"{url}/predict", json={"samples": [{"text": "a"}] * 300})),
            (415, lambda: requests.post(f"{url}/predict", data=b"hello", headers={"content-type": "text/plain"})),
        ]:
            response = call()
            assert response.status_code == status, (status, response.text)
            assert requests.post(f"{url}/predict", json=small, timeout=60).status_code == 200

        # 64 clients at once, each answered
        def one(i: int) -> int:
            return requests.post(f"{url}/predict", json={"samples": [as_request(rows[i % len(rows)])]},
                                 timeout=120).status_code

        with ThreadPoolExecutor(64) as pool:
            assert list(pool.map(one, range(64))) == [200] * 64

        metrics = requests.get(f"{url}/metrics", timeout=10).text
        ok = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith('tessera_requests_total{status="200"}'))
        assert ok == 1 + 1 + 1 + 6 + 64  # every 200 answered here
        assert 'tessera_requests_total{status="413"} 2.0' in metrics
        assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "alive"}
        assert requests.get(f"{url}/docs", timeout=10).status_code == 200
        ready = requests.get(f"{url}/readyz", timeout=10).json()
        assert ready["status"] == "ready" and ready["replicas"]["PredictionService"] == {"RUNNING": 1}

        # not JSON-safe bodies: a 422 (counted), never a 500, and never the body echoed back
        long_and_wrong = b'{"samples": [{"text": 5, "image": "' + b"A" * 10**6 + b'"}]}'
        for body in (b'{"samples": [{"text": "\xff\xfe"}]}', long_and_wrong):
            bad = requests.post(f"{url}/predict", data=body, headers={"content-type": "application/json"}, timeout=60)
            assert bad.status_code == 422 and len(bad.content) < 2000, bad.text[:500]

        # clients that send headers and part of a body, then nothing, more than a replica holds
        # at once: /healthz answers throughout, each stalled request gets 408 after
        # serve.read_timeout_s, and /predict is answered again
        stalled = stall(port, STALLED)
        try:
            waits = []
            until = time.monotonic() + 2 * READ_TIMEOUT_S
            while time.monotonic() < until:
                started_at = time.monotonic()
                assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
                waits.append(time.monotonic() - started_at)
                time.sleep(0.25)
            assert max(waits) < 2.0, waits
            answers = [s.recv(64) for s in stalled]
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]
        finally:
            for s in stalled:
                s.close()
        assert requests.post(f"{url}/predict", json=small, timeout=60).status_code == 200
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert f'tessera_requests_total{{status="408"}} {STALLED}.0' in metrics
        assert 'tessera_requests_total{status="422"} 5.0' in metrics and 'status="500"' not in metrics

        # the replica process killed: Serve replaces it, and the service answers again
        [replica] = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "ServeReplica:tessera" in " ".join(p.cmdline())]
        replica.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while True:
            try:
                if requests.post(f"{url}/predict", json=small, timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() - killed < 180, "no answer 180 s after the replica was killed"
            time.sleep(0.5)
        print(f"answered again {time.monotonic() - killed:.1f} s after the replica was killed")
    finally:
        terminated(proc)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]


def test_the_int8_bundle_is_served_without_torch_as_predict_gives_it(exported_mini, tmp_path):
    model, _ = exported_mini
    port = free_port()
    proc = started(model, port, "--variant", "int8", "--bundle")
    try:
        rows = [json.loads(line) for line in mini_manifest_lines(12)]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        predictor = Predictor(Store(str(model)), "int8", bundle=True)
        expected = {r["key"]: r for r in predict_inputs(predictor, [str(tmp_path / "rows.jsonl")])}
        got = requests.post(f"http://127.0.0.1:{port}/predict", json={"samples": [as_request(r) for r in rows]},
                            timeout=120)
        assert got.status_code == 200, got.text
        assert got.json()["model"]["variant"] == "int8" and got.json()["model"]["bundle"] is True
        for result in got.json()["results"]:
            assert_same(result, expected[result["key"]])
        [replica] = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "ServeReplica:tessera" in " ".join(p.cmdline())]
        libraries = [m.path for m in replica.memory_maps()]
        assert any("onnxruntime" in path for path in libraries)
        assert not [path for path in libraries if "libtorch" in path]  # the replica never loaded torch
    finally:
        terminated(proc)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
