"""Leases on output folders: one writer at a time, for as long as that writer is alive.

    FOLDER/lease.json   {"token", "fence", "command", "host", "pid", "acquired", "renewed",
                         "ttl_s", "released"}

Every writer of a folder (each stage on its own folder, `tessera run` and `tessera refresh` on
the job's OUT) holds its lease. It is taken by an exclusive create, or — once released or
expired (not renewed for its TTL) — by a compare-and-swap of the file (`Store.replace_if`:
If-Match on S3, flock on disk), so of several takers exactly one wins, from any host. A
heartbeat thread renews it every `heartbeat_s`. Each acquisition gets a fencing number one
above the last, and every commit point (a shard's marker, a sidecar, `latest`, a version's
`version.json`, a summary) calls `Fence.check`, which reads the file and refuses to commit when
the lease names another writer: a process paused past its TTL cannot overwrite its
successor's work. (The check and the write are two calls: what the check closes is the
window of a pause, not of a single request.) Expiry is judged by the taker's clock against
the holder's `renewed`: hosts' clocks must agree to well within the TTL (NTP does). On the
holder's own host, a lease whose process is gone is expired at once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import psutil
from pydantic import Field, model_validator

from tessera.core.config import Strict
from tessera.core.errors import LeaseHeld, LeaseLost
from tessera.core.storage import Store, out_of_space

log = logging.getLogger(__name__)

LEASE = "lease.json"


class LeaseConfig(Strict):
    """How a writer holds its folder (runtime.lease)."""

    ttl_s: float = Field(60.0, gt=0, description="a lease not renewed for this long may be taken over")
    heartbeat_s: float = Field(10.0, gt=0, description="how often the holder renews it")
    wait: bool = Field(False, description="wait for a held folder instead of exiting 75 (`--wait`)")

    @model_validator(mode="after")
    def _renewed_within_ttl(self) -> LeaseConfig:
        # renewed at least twice per TTL: one late beat (a slow store call) must not hand a live
        # writer's folder to another
        if self.heartbeat_s > self.ttl_s / 2:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be at most half of ttl_s ({self.ttl_s}), or a "
                             "second writer may take over a live lease")
        return self


DEFAULT_LEASE = LeaseConfig()


def describe(record: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["acquired"]))
    return (f"{record['command']} (pid {record['pid']} on {record['host']}, fence {record['fence']}) since {since}, "
            f"renewed {time.time() - record['renewed']:.0f} s ago")


def _read(folder: Store) -> tuple[dict, str] | None:
    try:
        data, tag = folder.read_versioned(LEASE)
    except FileNotFoundError:
        return None
    return json.loads(data), tag


@dataclass(frozen=True)
class Fence:
    """What a commit point checks: the folder's lease still names this writer. Picklable, so
    the Ray tasks and actors that commit take one."""

    folder: Store
    token: str
    number: int

    def check(self, what: str) -> None:
        found = _read(self.folder)
        record = found[0] if found else None
        if record is None or record["token"] != self.token or record.get("released"):
            now = describe(record) if record and not record.get("released") else "no one"
            raise LeaseLost(f"{self.folder.url}: this writer's lease (fence {self.number}) is held by {now} now: "
                            f"{what} is not committed")


class Lease:
    """A writer's lease on FOLDER while the `with` block runs; `fence` is what its commit
    points check. Raises LeaseHeld when a live writer holds it (unless config.wait)."""

    def __init__(self, folder: Store, config: LeaseConfig, command: str):
        self.folder, self.config, self.command = folder, config, command
        self.token = uuid.uuid4().hex
        self.fence: Fence | None = None
        self.lost: str | None = None  # what the heartbeat found, once another writer holds the lease
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def _record(self, number: int) -> dict:
        now = time.time()
        return {"token": self.token, "fence": number, "command": self.command, "host": socket.gethostname(),
                "pid": os.getpid(), "acquired": now, "renewed": now, "ttl_s": self.config.ttl_s, "released": False}

    def _take(self) -> bool:
        """One try: True once this writer holds the lease; LeaseHeld when a live one does."""
        found = _read(self.folder)
        if found is None:
            record = self._record(1)
            data = json.dumps(record).encode()
            if not self.folder.create_exclusive(LEASE, data):
                return False
            self.fence = Fence(self.folder, self.token, 1)
            return True
        held, tag = found
        expired = time.time() - held["renewed"] > held["ttl_s"] or (  # or its process is gone from this host
            held["host"] == socket.gethostname() and not psutil.pid_exists(held["pid"]))
        if not held.get("released") and not expired:
            raise LeaseHeld(f"{self.folder.url} is held by {describe(held)}")
        record = self._record(held["fence"] + 1)
        if self.folder.replace_if(LEASE, json.dumps(record).encode(), tag) is None:
            return False
        if expired and not held.get("released"):
            log.warning("%s: took over the lease of %s", self.folder.url, describe(held))
        self.fence = Fence(self.folder, self.token, record["fence"])
        return True

    def __enter__(self) -> Fence:
        while True:
            try:
                if self._take():
                    break
            except LeaseHeld:
                if not self.config.wait:
                    raise
                time.sleep(self.config.heartbeat_s)
        self._beating = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._beating.start()
        return self.fence

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            try:
                held, tag = _read(self.folder) or ({"token": None}, "")
                if held["token"] != self.token:
                    self.lost = describe(held) if held["token"] else "no one (the lease file is gone)"
                    log.error("%s: this writer's lease was taken over by %s", self.folder.url, self.lost)
                    return
                # (refused when another writer changed it meanwhile: the next beat reads it again)
                self.folder.replace_if(LEASE, json.dumps({**held, "renewed": time.time()}).encode(), tag)
            except Exception as error:  # a heartbeat that fails is tried again; the TTL decides
                log.warning("%s: lease heartbeat failed (%s); trying again", self.folder.url, error)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        try:
            found = _read(self.folder)
            if found and found[0]["token"] == self.token:  # released for the next writer, its fence kept
                self.folder.replace_if(LEASE, json.dumps({**found[0], "released": True}).encode(), found[1])
        except OSError as error:
            if out_of_space(error) is None:  # (the lease expires with its TTL; the run's own error matters more)
                log.warning("%s: the lease could not be released (%s)", self.folder.url, error)
                return
            # a full disk has no room for the released record: removing the file needs none
            self.folder.remove(LEASE)
            log.warning("%s: released the lease by removing it (no space left for the record)", self.folder.url)


def held(folder: Store, lease: LeaseConfig | Fence, command: str) -> contextlib.AbstractContextManager[Fence]:
    """The fence of the writer of FOLDER for a `with` block: LEASE itself when the caller holds
    the folder already (the CLI takes it before it starts Ray), else a lease taken for the block."""
    if isinstance(lease, Fence):
        if lease.folder.url != folder.url:
            raise ValueError(f"a fence of {lease.folder.url} does not hold {folder.url}")
        return contextlib.nullcontext(lease)
    return Lease(folder, lease, command)
