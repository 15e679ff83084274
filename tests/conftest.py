"""Shared fixtures: the shared corpora, one session-wide Ray, the label set."""

from __future__ import annotations

import os
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

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
