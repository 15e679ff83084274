"""Shared fixtures: the shared corpora, one session-wide Ray, the label set."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
