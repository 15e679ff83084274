"""tessera serve --runtime edge: the bundle from one process (no Ray, no torch) over real HTTP on
loopback, answering as predict --bundle does; and hybrid: an edge that sends what it is not
sure of to another service, and answers itself (degraded) when that service is gone."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tessera.core.storage import Store
from tessera.workflows.config import FallbackConfig
from tessera.workflows.edge import Batcher
from tessera.workflows.predict import Predictor, predict_inputs
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
def test_an_edge_answers_as_predict_does_without_ray_or_torch_and_falls_back_to_the_cloud(exported_mini, tmp_path,
                                                                                           monkeypatch):
    model, _ = exported_mini
    cloud_port, edge_port = free_port(), free_port()
    with monkeypatch.context() as patched:  # the first one runs as in an edge install: no pipeline module at all
        patched.setenv("PYTHONPATH", str(EDGE_INSTALL))
        cloud = started(model, cloud_port, "--bundle", "--runtime", "edge")
    edge = None
    try:
        cloud_url = f"http://127.0.0.1:{cloud_port}"
        rows = [json.loads(line) for line in mini_manifest_lines(12)]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        expected = {r["key"]: r for r in predict_inputs(Predictor(Store(str(model)), bundle=True),
                                                        [str(tmp_path / "rows.jsonl")])}
        samples = [as_request(r) for r in rows]
        answered = _results(cloud_url, samples)
        assert [r["key"] for r in answered] == [r["key"] for r in rows]
        for result in answered:
            assert_same(result, expected[result["key"]])
            assert result["served_by"] == "edge" and "degraded" not in result
        maps = Path(f"/proc/{cloud.pid}/maps").read_text()
        assert "onnxruntime" in maps  # ... and none of torch, Ray, Arrow
        assert not [lib for lib in ("libtorch", "_raylet", "libarrow", "duckdb") if lib in maps]
        for status, call in [
            (422, lambda: requests.post(f"{cloud_url}/predict", json={"samples": [{"text": 5}]})),
            (413, lambda: requests.post(f"{cloud_url}/predict", json={"samples": [{"text": "a"}] * 300})),
            (415, lambda: requests.post(f"{cloud_url}/predict", data=b"hi", headers={"content-type": "text/plain"})),
        ]:
            assert call().status_code == status
        assert requests.get(f"{cloud_url}/healthz", timeout=10).json() == {"status": "alive"}
        assert requests.get(f"{cloud_url}/readyz", timeout=10).status_code == 200

        # hybrid: an edge sure of nothing (min_confidence 1) sends every sample on, in one request
        edge = started(model, edge_port, "--bundle", "--runtime", "edge",
                       "--set", f'serve.fallback.url="{cloud_url}"', "--set", "serve.fallback.min_confidence=1.0",
                       "--set", "serve.fallback.breaker_failures=2", "--set", "serve.fallback.timeout_s=2",
                       "--set", "serve.fallback.breaker_cooldown_s=600")
        edge_url = f"http://127.0.0.1:{edge_port}"
        requests_before = _metric(cloud_url, 'tessera_requests_total{status="200"}')
        hybrid = _results(edge_url, samples)
        assert [r["served_by"] for r in hybrid] == ["cloud"] * len(rows)
        for result in hybrid:
            assert_same(result, expected[result["key"]])
        assert _metric(cloud_url, 'tessera_requests_total{status="200"}') == requests_before + 1
        # the same offline: tessera predict --bundle --fallback (the rows' files sent inline)
        offline = Predictor(Store(str(model)), bundle=True, fallback=FallbackConfig(url=cloud_url, min_confidence=1.0))
        by_predict = list(predict_inputs(offline, [str(tmp_path / "rows.jsonl")]))
        assert [r["served_by"] for r in by_predict] == ["cloud"] * len(rows)
        for record in by_predict:
            assert_same(record, expected[record["key"]])

        # the cloud gone: the edge answers itself, degraded, never an error; after two failed
        # requests the breaker is open
        terminated(cloud)
        for _ in range(2):
            down = _results(edge_url, samples[:3])
            assert all(r["served_by"] == "edge" and r["degraded"] is True for r in down)
            for result in down:
                assert_same(result, expected[result["key"]])
        assert _metric(edge_url, "tessera_fallback_breaker_open") == 1.0
        offline_down = list(predict_inputs(offline, [str(tmp_path / "rows.jsonl")]))
        assert all(r["served_by"] == "edge" and r["degraded"] is True for r in offline_down)
        assert all(r["degraded"] for r in _results(edge_url, samples[:3]))
        assert _metric(edge_url, 'tessera_samples_served_total{degraded="true",served_by="edge"}') == 9
        assert _metric(edge_url, 'tessera_samples_served_total{degraded="false",served_by="cloud"}') == len(rows)
    finally:
        terminated(cloud)
        if edge is not None:
            terminated(edge)
    assert edge.returncode == 0, edge.stderr.read()[-3000:]
