"""A real multi-node Ray cluster on loopback: `ray start --head` plus two worker nodes with their
own CPUs, `tessera` jobs submitted to it, and a worker node killed in the middle of sharding."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import LABELS, MINI, REPO, free_port, index_rows, reject_rows

RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a loopback test cluster; no token to hand around


def ray_start(*args: str) -> None:
    subprocess.run([RAY, "start", "--disable-usage-stats", *args], check=True, env=ENV,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (no CPUs: drivers only) + worker nodes A and B (1 CPU each). Yields (address, B's raylet port)."""
    port, b_port = free_port(), free_port()
    before = set(psutil.pids())
    ray_start("--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false")
    address = f"127.0.0.1:{port}"
    ray_start(f"--address={address}", "--num-cpus=1")
    ray_start(f"--address={address}", "--num-cpus=1", f"--node-manager-port={b_port}")
    yield address, b_port
    # `ray stop` would also stop the test session's own local Ray: end only what this cluster
    # started (daemons detached from this process, so not among its descendants)
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    for pid in set(psutil.pids()) - before - ours - {os.getpid()}:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if "ray" in " ".join(process.cmdline()).lower():
                process.kill()
    # `ray start` recorded this cluster as the machine's default; it is gone now
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def tessera(*args: str, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workflows", *args, "--address", address, "--no-progress"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def write_config(path: Path, out: Path) -> Path:
    path.write_text(json.dumps({
        "job": {"manifest": str(MINI / "manifest.jsonl"), "out": str(out)},
        "shard": {"samples_per_shard": 4, "labels": list(LABELS)},
        "embed": {"actors": 2, "cpus_per_actor": 1},
        "train": {"workers": 2, "max_steps": 4, "micro_batch_size": 4},
    }))
    return path


def test_tessera_run_spreads_over_the_nodes(cluster, tmp_path):
    address, _ = cluster
    out = tmp_path / "out"
    proc = tessera("run", str(write_config(tmp_path / "job.yaml", out)), address=address)
    log, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((out / "run-summary.json").read_text())
    shard = report["stages"]["shard"]
    assert shard["accepted"] == 43 and len(shard["shards_by_node"]) >= 2, shard["shards_by_node"]
    assert report["stages"]["embed"]["samples"] == 43 and report["stages"]["train"]["steps"] == 4


def test_worker_node_killed_mid_shard_stage(cluster, tmp_path):
    address, b_port = cluster
    out = tmp_path / "shards"
    proc = tessera("shard", str(MINI / "manifest.jsonl"), str(out), "--samples-per-shard", "2",
                   "--set", f"shard.labels={json.dumps(list(LABELS))}", address=address)
    deadline = time.monotonic() + 180
    while not list(out.glob("shard-0*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    raylet = next(p for p in psutil.process_iter(["name", "cmdline"])
                  if "raylet" in (p.info["name"] or "") and f"--node_manager_port={b_port}" in " ".join(
                      p.info["cmdline"] or []))
    victims = [raylet, *raylet.children(recursive=True)]
    for p in victims:  # node B dies with whatever shard task it was running
        p.send_signal(signal.SIGKILL)
    assert not (out / "summary.json").exists()
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    index, rejects = index_rows(out), reject_rows(out)
    assert summary["inputs"] == 43 and len(index) + len(rejects) == 43 and len(index) == 43
    markers = sorted(out.glob("shard-0*.json"))
    assert len(markers) == summary["shards"] == 22
    for marker in markers:  # every listed shard is whole: its tar holds exactly its samples
        with tarfile.open(marker.with_suffix(".tar")) as tar:
            keys = {name.split(".", 1)[0] for name in tar.getnames()}
        assert keys == {row["key"] for row in index if row["shard"] == marker.with_suffix(".tar").name}
