"""How and where a job runs (`runtime:` in the config): connecting to Ray (an existing
cluster: address / RAY_ADDRESS, or an embedded local one), SIGTERM as a clean stop, and the
command's worker output kept in the output folder's logs/. Ray is imported when it is used:
loading a config does not."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from tessera.core.config import Strict
from tessera.core.lease import LeaseConfig
from tessera.core.storage import Store

log = logging.getLogger(__name__)

LOGS = "logs"  # FOLDER/logs/<UTC time>-<command>/: a writing command's driver log and workers' output


class RuntimeConfig(Strict):
    """Where and how wide a job runs; none of it changes the outputs."""

    address: str | None = Field(None, description="Ray address; null starts a local Ray")
    workers: int = Field(2, gt=0, description="CPUs of the local Ray, and parallel shard tasks")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. S3")
    progress: bool = True
    verbose: bool = Field(False, description="worker and library output on the terminal, not only in OUT/logs")
    lease: LeaseConfig = LeaseConfig()

    def store(self, url: str) -> Store:
        """The store of URL with these storage options: built once per location a job names,
        then handed down (every other location is reached through it)."""
        return Store(url, self.storage_options)


LOG_FILE_BYTES = 1 << 20  # of a worker's output file copied into FOLDER/logs (its end)
LOG_TOTAL_BYTES = 32 << 20  # of all of them
IDLE_POOL = "ffffffff"  # the job id in the log names of workers a session started before any job took them


def worker_logging() -> None:
    """Each Ray worker's setup: its INFO records to its stderr (the node's worker log; the
    terminal too with -v)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cluster_address(runtime: RuntimeConfig) -> str | None:
    """The cluster a command connects to; None: it starts a local Ray."""
    return runtime.address or os.environ.get("RAY_ADDRESS") or None


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the command (a scheduler stopping it): raised in the main thread as a
    KeyboardInterrupt (what Ray's waits know how to be interrupted by), so that in-flight work is
    waited for, the lease released and the logs kept."""


# set when SIGTERM arrived: a Terminated raised while Ray's core worker waits (ray.wait, ray.get)
# comes out of the wait as a plain KeyboardInterrupt, which must not be taken for Ctrl-C
_SIGTERM_RECEIVED = threading.Event()


def _terminated(signum, frame) -> None:
    _SIGTERM_RECEIVED.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a second one must not cut the clean-up short)
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def terminated(interrupt: KeyboardInterrupt) -> bool:
    """Whether INTERRUPT is SIGTERM's (Terminated, or what a Ray wait made of it), not Ctrl-C's."""
    return isinstance(interrupt, Terminated) or _SIGTERM_RECEIVED.is_set()


def stop_on_sigterm() -> None:
    """SIGTERM as Terminated from now on (ray.init installs a handler that exits at once, and its
    core worker one that prints a native stack: this one replaces both)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def start_ray(runtime: RuntimeConfig) -> None:
    """Connect to RUNTIME's cluster or start a local Ray. Worker output reaches the terminal
    only with runtime.verbose (it is in the nodes' Ray logs, and `save_logs` keeps a local
    Ray's); worker progress bars are drawn only when they are shown."""
    import ray

    if ray.is_initialized():
        return
    ray_logger = logging.getLogger("ray")  # Ray's driver-side records: through our handlers, not its own
    ray_logger.handlers, ray_logger.propagate = [], True
    quiet = {} if runtime.verbose and runtime.progress else {"TQDM_DISABLE": "1"}
    options = dict(log_to_driver=runtime.verbose,
                   runtime_env={"env_vars": quiet, "worker_process_setup_hook": f"{__name__}.worker_logging"})
    address = cluster_address(runtime)
    if address:
        ray.init(address=address, **options)
        log.info("connected to Ray at %s: %s", address, ray.cluster_resources())
    else:
        ray.init(address="local", num_cpus=runtime.workers, include_dashboard=False, **options)
        log.info("started a local Ray with %d CPUs", runtime.workers)
    stop_on_sigterm()


def local_logs() -> str | None:
    """The folder of this process's driver log (setup_logging's), on this machine."""
    handler = next((h for h in logging.getLogger().handlers if getattr(h, "tessera", False)
                    and isinstance(h, logging.FileHandler)), None)
    return str(Path(handler.baseFilename).parent) if handler else None


def save_logs(folder: Store, command: str, runtime: RuntimeConfig) -> str:
    """This command's driver log and, from the local Ray this command started, its workers'
    output, into FOLDER/logs/<UTC time>-<command>/ through the store; returns that folder's URL.
    Only this Ray session's files (never another job's on the same host, whichever session is
    newest), only workers of this job or of the session's idle pool, each file's last
    LOG_FILE_BYTES, LOG_TOTAL_BYTES in all. (On a cluster the workers' output stays in each
    node's Ray logs.)"""
    target = folder.child(LOGS, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + command.split()[-1])
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and getattr(handler, "tessera", False):  # setup_logging's
            handler.flush()
            target.put_file(handler.baseFilename, Path(handler.baseFilename).name)
    budget = LOG_TOTAL_BYTES
    for path in _own_worker_logs(runtime):
        size = path.stat().st_size
        if not size or budget <= 0:
            continue
        keep = min(size, LOG_FILE_BYTES, budget)
        with path.open("rb") as f:
            f.seek(size - keep)
            data = f.read(keep)
        if keep < size:
            data = f"[the first {size - keep} bytes of this file are left out]\n".encode() + data
        target.write_bytes(path.name, data)
        budget -= len(data)
    return target.url


def _own_worker_logs(runtime: RuntimeConfig) -> list[Path]:
    """The worker-*.out/err files of this command's own local Ray session and job."""
    import ray

    if not ray.is_initialized() or cluster_address(runtime) is not None:
        return []
    node = getattr(ray._private.worker, "_global_node", None)  # the session this process started or joined
    if node is None:
        return []
    job = ray.get_runtime_context().get_job_id()
    logs = Path(node.get_logs_dir_path())
    # worker-<worker id>-<job id>-<pid>: workers started for this job, or prestarted idle (ffffffff) ones
    return sorted(p for p in logs.glob("worker-*") if p.suffix in (".out", ".err")
                  and p.stem.split("-")[2:3] in ([job], [IDLE_POOL]))
