"""tessera serve --runtime edge: the bundle from one process (no Ray, no torch) over real HTTP on
loopback, answering as predict --bundle does; and hybrid: an edge that sends what it is not
sure of to another service, and answers itself (degraded) when that service is gone."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tessera.core.storage import Store
from tessera.train.tasks import Task
from tessera.workflows.config import FallbackConfig
from tessera.workflows.edge import Batcher
from tessera.workflows.predict import Predictor, predict_inputs
from tessera.workflows.service import Fallback
from tests.conftest import REPO, TESSERA, free_port, mini_manifest_lines, terminated
from tests.workflows.test_serve import as_request, assert_same, started


def test_the_batcher_scores_what_arrives_together_in_one_call():
    calls = []

    def score(batch):
        calls.append(len(batch))
        return [{"n": n} for n in batch]

    async def main():
        batcher = Batcher(score, max_size=4, wait_s=0.05, observe=lambda n: None)
        first = await asyncio.gather(*(batcher(n) for n in range(6)))
        alone = await batcher(99)
        return first, alone

    first, alone = asyncio.run(main())
    assert first == [{"n": n} for n in range(6)] and alone == {"n": 99}  # each its own answer, in order
    assert calls == [4, 2, 1]


def test_fallback_thresholds_are_probabilities_of_classification_tasks():
    assert FallbackConfig(min_confidence=0.7).thresholds("label") == {"label": 0.7}
    assert FallbackConfig(min_confidence={"label": 0.6, "topic": 0.8}).thresholds("label") == {"label": 0.6,
                                                                                               "topic": 0.8}
    with pytest.raises(ValueError, match="not a probability"):
        FallbackConfig(min_confidence=1.5)


PIPELINE = ("torch", "ray", "deepspeed", "transformers", "sentence_transformers", "duckdb", "lance", "pyarrow",
            "pandas", "sklearn", "webdataset", "mlflow", "matplotlib")


def test_the_edge_runtime_and_predict_import_no_pipeline_dependency():
    code = ("import sys\nimport tessera.workflows.cli, tessera.workflows.edge, tessera.workflows.predict\n"
            "import tessera.features.onnx_encoders\nprint(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    loaded = {name.split(".")[0] for name in done.stdout.split()}
    assert not loaded & set(PIPELINE), loaded & set(PIPELINE)


class FakeCloud(ThreadingHTTPServer):
    """A /predict service on loopback that answers every sample `cloudy` after DELAY seconds."""

    def __init__(self, delay: float = 0.0):
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                samples = json.loads(self.rfile.read(int(self.headers["content-length"])))["samples"]
                cloud.received.append(samples)
                time.sleep(cloud.delay)
                body = json.dumps({"results": [{"key": s.get("key", "?"), "predictions": {"label": "cloudy"},
                                                "scores": {"label": {"cloudy": 0.9, "sunny": 0.1}},
                                                "served_by": "cloud"} for s in samples]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.delay, self.received = delay, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


LABEL_TASK = [Task("label", "label", "classification", ("cloudy", "sunny"))]


def _edge_result(top: float) -> dict:
    return {"key": "k", "predictions": {"label": "sunny"}, "scores": {"label": {"sunny": top, "cloudy": 1 - top}},
            "served_by": "edge"}


def test_unsure_samples_and_samples_of_a_modality_the_model_lacks_go_on_and_the_rest_stay():
    cloud = FakeCloud()
    try:
        fallback = Fallback(FallbackConfig(url=cloud.url, min_confidence=0.8), LABEL_TASK)
        samples = [{"key": "sure", "text": "a"}, {"key": "unsure", "text": "b"},
                   {"key": "sure-with-video", "text": "c", "video": "AAAA"}]
        results = [_edge_result(0.95), _edge_result(0.6), _edge_result(0.95)]
        assert fallback.settle(samples, results, modalities={"text", "image"})
        assert [r["served_by"] for r in results] == ["edge", "cloud", "cloud"]
        assert results[1]["predictions"] == {"label": "cloudy"} and results[1]["scores"]["label"]["cloudy"] == 0.9
        assert [[s["key"] for s in request] for request in cloud.received] == [["unsure", "sure-with-video"]]
        assert not fallback.settle(samples[:1], [_edge_result(0.95)], {"text"})  # nothing to send: no request
        assert len(cloud.received) == 1
    finally:
        cloud.shutdown()


def test_a_slow_fallback_costs_at_most_its_timeout_and_the_answer_is_degraded():
    cloud = FakeCloud(delay=5.0)
    try:
        fallback = Fallback(FallbackConfig(url=cloud.url, min_confidence=0.8, timeout_s=0.5, retries=0), LABEL_TASK)
        results = [_edge_result(0.6)]
        started_at = time.monotonic()
        fallback.settle([{"key": "k", "text": "b"}], results, {"text"})
        assert time.monotonic() - started_at < 1.5
        assert results[0]["served_by"] == "edge" and results[0]["degraded"] is True
    finally:
        cloud.shutdown()


EDGE_INSTALL = Path(__file__).parent / "edge_install"  # a sitecustomize: pipeline modules not installed


def test_a_pipeline_command_in_an_edge_install_names_the_extra_it_needs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(EDGE_INSTALL)}
    done = subprocess.run([*TESSERA, "shard", str(tmp_path / "m.jsonl"), str(tmp_path / "out")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs the pipeline install (no module" in done.stderr and "tessera[pipeline]" in done.stderr
    assert "Traceback" not in done.stderr


def _results(url: str, samples: list[dict]) -> list[dict]:
    got = requests.post(f"{url}/predict", json={"samples": samples}, timeout=120)
    assert got.status_code == 200, got.text
    return got.json()["results"]


def _metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.slow
def test_hybrid_the_edge_answers_what_it_is_sure_of_and_the_cloud_the_rest_even_when_it_goes_away(
        exported_mini, tmp_path, monkeypatch):
    """The cloud: `tessera serve` on Ray Serve (the torch encoders); the edge: the bundle (ONNX
    encoders) on the edge runtime, run as in an edge install (no pipeline module importable),
    forwarding what it is less sure of than about half the samples. (One export: the int8 head
    would tell the two apart, but its activations are quantized per batch, so the cloud's
    answers would depend on which samples were forwarded together.)"""
    model, _ = exported_mini
    rows = [json.loads(line) for line in mini_manifest_lines(12)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    edge_alone = {r["key"]: r for r in predict_inputs(Predictor(Store(str(model)), bundle=True),
                                                      [str(tmp_path / "rows.jsonl")])}
    cloud_alone = {r["key"]: r for r in predict_inputs(Predictor(Store(str(model))),
                                                       [str(tmp_path / "rows.jsonl")])}
    tops = {key: max(r["scores"]["label"].values()) for key, r in edge_alone.items()}
    ordered = sorted(tops.values())
    # the bound: between two neighbouring tops near the median, far from both (a batch of
    # other samples moves a score by ~1e-7)
    k = min((k for k in range(1, len(ordered)) if ordered[k] - ordered[k - 1] > 1e-3),
            key=lambda k: abs(k - len(ordered) / 2))
    bound = round((ordered[k - 1] + ordered[k]) / 2, 6)
    unsure = {key for key, top in tops.items() if top < bound}
    assert 0 < len(unsure) < len(rows)
    samples = [as_request(r) for r in rows]
    cloud_port, edge_port = free_port(), free_port()
    cloud_url, edge_url = f"http://127.0.0.1:{cloud_port}", f"http://127.0.0.1:{edge_port}"
    cloud = started(model, cloud_port)
    edge = None
    try:
        with monkeypatch.context() as patched:
            patched.setenv("PYTHONPATH", str(EDGE_INSTALL))
            edge = started(model, edge_port, "--bundle", "--runtime", "edge",
                           "--set", f'serve.fallback.url="{cloud_url}"',
                           "--set", f"serve.fallback.min_confidence={bound}",
                           "--set", "serve.fallback.breaker_failures=2", "--set", "serve.fallback.timeout_s=5",
                           "--set", "serve.fallback.breaker_cooldown_s=3")
        maps = Path(f"/proc/{edge.pid}/maps").read_text()
        assert "onnxruntime" in maps and not [lib for lib in ("libtorch", "_raylet", "libarrow") if lib in maps]

        answered = _results(edge_url, samples)
        assert [r["key"] for r in answered] == [r["key"] for r in rows]
        for result in answered:  # forwarded ones carry the cloud's answer, the others the edge's
            forwarded = result["key"] in unsure
            assert result["served_by"] == ("cloud" if forwarded else "edge") and "degraded" not in result
            assert_same(result, (cloud_alone if forwarded else edge_alone)[result["key"]])
        assert _metric(cloud_url, 'tessera_requests_total{status="200"}') == 1  # one request for all of them
        assert _metric(cloud_url, 'tessera_samples_total{outcome="predicted"}') == len(unsure)
        for status, call in [
            (422, lambda: requests.post(f"{edge_url}/predict", json={"samples": [{"text": 5}]})),
            (413, lambda: requests.post(f"{edge_url}/predict", json={"samples": [{"text": "a"}] * 300})),
            (415, lambda: requests.post(f"{edge_url}/predict", data=b"hi", headers={"content-type": "text/plain"})),
        ]:
            assert call().status_code == status

        # the same offline: tessera predict --bundle --fallback (the rows' files sent inline)
        offline = Predictor(Store(str(model)), bundle=True,
                            fallback=FallbackConfig(url=cloud_url, min_confidence=bound))
        for record in predict_inputs(offline, [str(tmp_path / "rows.jsonl")]):
            assert record["served_by"] == ("cloud" if record["key"] in unsure else "edge")
            assert_same(record, (cloud_alone if record["key"] in unsure else edge_alone)[record["key"]])

        # the cloud gone: every request still 200, the unsure samples the edge's own, degraded;
        # two failed requests open the breaker
        terminated(cloud)
        for _ in range(3):
            down = _results(edge_url, samples)
            assert all(r["degraded"] is True for r in down if r["key"] in unsure)
            assert all(r["served_by"] == "edge" for r in down)
            for result in down:
                assert_same(result, edge_alone[result["key"]])
        assert _metric(edge_url, "tessera_fallback_breaker_open") == 1.0

        # the cloud back: after the cool-down a probe gets through and the breaker closes
        cloud = started(model, cloud_port)
        time.sleep(3.5)
        back = _results(edge_url, samples)
        assert [r["served_by"] for r in back] == ["cloud" if r["key"] in unsure else "edge" for r in back]
        assert _metric(edge_url, "tessera_fallback_breaker_open") == 0.0

        # what /metrics counts is what was answered
        n, u = len(rows), len(unsure)
        assert _metric(edge_url, 'tessera_samples_served_total{degraded="false",served_by="cloud"}') == 2 * u
        assert _metric(edge_url, 'tessera_samples_served_total{degraded="true",served_by="edge"}') == 3 * u
        assert _metric(edge_url, 'tessera_samples_served_total{degraded="false",served_by="edge"}') == 5 * (n - u)
        assert _metric(edge_url, 'tessera_requests_total{status="200"}') == 5
        assert _metric(edge_url, "tessera_fallback_seconds_count") == 5
    finally:
        terminated(cloud)
        if edge is not None:
            terminated(edge)
    assert edge.returncode == 0, edge.stderr.read()[-3000:]


@pytest.mark.slow
def test_a_fresh_edge_install_has_no_torch_or_ray_and_serves_and_predicts_the_int8_bundle(exported_mini, tmp_path):
    """`pip install '.[edge]'` from this checkout into a new venv (dependencies from the package
    index, with the repo's constraints), then the edge runtime from it over real HTTP (without
    tessera[video]: the video samples are rejects naming it)."""
    model, _ = exported_mini
    venv = tmp_path / "edge"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-c", str(REPO / "constraints.txt"),
                                f"{REPO}[edge]"], capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    for module in ("torch", "ray", "deepspeed", "transformers", "pyarrow", "duckdb"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"{module} is importable in the edge install"
    shard = subprocess.run([str(venv / "bin" / "tessera"), "shard", str(tmp_path / "m.jsonl"), str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=120)
    assert shard.returncode == 2 and "tessera[pipeline]" in shard.stderr and "Traceback" not in shard.stderr

    rows = [json.loads(line) for line in mini_manifest_lines(12)]
    # what the full install predicts for the rows the edge install can read, as one batch, as the
    # server gets them (int8 activations are quantized per batch: the batch matters)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if "video" not in r))
    expected = {r["key"]: r for r in predict_inputs(Predictor(Store(str(model)), "int8", bundle=True),
                                                    [str(tmp_path / "rows.jsonl")])}
    # tessera predict --bundle in the edge install: the same records
    predicted = subprocess.run([str(venv / "bin" / "tessera"), "predict", str(model), str(tmp_path / "rows.jsonl"),
                                "--bundle", "--variant", "int8"], capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [r["key"] for r in records] == list(expected)
    for record in records:
        assert_same(record, expected[record["key"]])
    port = free_port()
    server = started(model, port, "--bundle", "--runtime", "edge", "--variant", "int8",
                     tessera=(str(venv / "bin" / "tessera"),))
    try:
        url = f"http://127.0.0.1:{port}"
        answered = _results(url, [as_request(r) for r in rows])
        assert [r["key"] for r in answered] == [r["key"] for r in rows]
        with_video = {r["key"] for r in rows if "video" in r}
        assert with_video and len(with_video) < len(rows)
        for result in answered:
            if result["key"] in with_video:  # PyAV is tessera[video]'s: the sample says so
                assert "tessera[video]" in result["error"]
                continue
            assert result["served_by"] == "edge"
            assert_same(result, expected[result["key"]])
        assert requests.post(f"{url}/predict", json={"samples": [{"text": 5}]}, timeout=30).status_code == 422
        assert requests.post(f"{url}/predict", data=b"hi", headers={"content-type": "text/plain"},
                             timeout=30).status_code == 415
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        terminated(server)
    assert server.returncode == 0, server.stderr.read()[-3000:]
