"""Connecting to Ray: an existing cluster (address / RAY_ADDRESS) or an embedded local one."""

from __future__ import annotations

import logging
import os

import ray

from workflows.config import RuntimeConfig

log = logging.getLogger(__name__)


def start_ray(runtime: RuntimeConfig) -> None:
    if ray.is_initialized():
        return
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to Ray at %s: %s", address, ray.cluster_resources())
    else:
        ray.init(address="local", num_cpus=runtime.workers, include_dashboard=False, log_to_driver=True)
        log.info("started a local Ray with %d CPUs", runtime.workers)
