"""Connecting to Ray (an existing cluster: address / RAY_ADDRESS, or an embedded local one) and
what of it reaches the terminal: logging set up once per command, worker output kept in the
output folder's logs/."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray

from preprocess.storage import Store
from workflows.config import RuntimeConfig
from workflows.layout import LOGS

log = logging.getLogger(__name__)


NODE_LOGS = Path("/tmp/ray/session_latest/logs")  # Ray's default place for a node's logs
def worker_logging() -> None:
    """Each Ray worker's setup: its INFO records to its stderr (the node's worker log; the
    terminal too with -v)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cluster_address(runtime: RuntimeConfig) -> str | None:
    """The cluster a command connects to; None: it starts a local Ray."""
    return runtime.address or os.environ.get("RAY_ADDRESS") or None


def start_ray(runtime: RuntimeConfig) -> None:
    """Connect to RUNTIME's cluster or start a local Ray. Worker output reaches the terminal
    only with runtime.verbose (it is in the nodes' Ray logs, and `save_logs` keeps a local
    Ray's); worker progress bars are drawn only when they are shown."""
    if ray.is_initialized():
        return
    ray_logger = logging.getLogger("ray")  # Ray's driver-side records: through our handlers, not its own
    ray_logger.handlers, ray_logger.propagate = [], True
    quiet = {} if runtime.verbose and runtime.progress else {"TQDM_DISABLE": "1"}
    options = dict(log_to_driver=runtime.verbose,
                   runtime_env={"env_vars": quiet, "worker_process_setup_hook": "workflows.runtime.worker_logging"})
    address = cluster_address(runtime)
    if address:
        ray.init(address=address, **options)
        log.info("connected to Ray at %s: %s", address, ray.cluster_resources())
    else:
        ray.init(address="local", num_cpus=runtime.workers, include_dashboard=False, **options)
        log.info("started a local Ray with %d CPUs", runtime.workers)


def save_logs(folder: Store, command: str, runtime: RuntimeConfig) -> str:
    """This command's driver log and, from a local Ray, its workers' output, into
    FOLDER/logs/<UTC time>-<command>/ through the store; returns that folder's URL. (On a
    cluster the workers' output stays in each node's Ray logs.)"""
    target = folder.child(LOGS, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + command.split()[-1])
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and getattr(handler, "tessera", False):  # setup_logging's
            handler.flush()
            target.put_file(handler.baseFilename, Path(handler.baseFilename).name)
    if ray.is_initialized() and cluster_address(runtime) is None and NODE_LOGS.is_dir():
        for path in sorted(NODE_LOGS.glob("worker-*")):
            if path.suffix in (".out", ".err") and path.stat().st_size:
                target.put_file(str(path), path.name)
    return target.url
