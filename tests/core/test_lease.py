"""Leases on output folders, with real processes: one writer at a time, a dead one's lease
taken over after its TTL (at once on its own host), a writer paused past its TTL refused at
its next commit, fencing numbers that grow with every acquisition; on disk and on S3."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tessera.core.errors import LeaseHeld, LeaseLost
from tessera.core.lease import LEASE, Lease, LeaseConfig
from tessera.core.storage import Store
from tests.conftest import REPO

QUICK = LeaseConfig(ttl_s=2.0, heartbeat_s=0.25)

# A writer in a process of its own: takes the lease, says so, then commits (checks its
# fence) each time it reads a line; its exit status tells how the last commit went.
WRITER = """
import json, sys
from tessera.core.lease import Lease, LeaseConfig
from tessera.core.errors import LeaseLost
from tessera.core.storage import Store
folder = Store(sys.argv[1], json.loads(sys.argv[2]))
with Lease(folder, LeaseConfig(ttl_s=2.0, heartbeat_s=0.25), "writer") as fence:
    print("held", fence.number, flush=True)
    for line in sys.stdin:
        try:
            fence.check("a commit")
        except LeaseLost as e:
            print("refused", e, flush=True)
            sys.exit(3)
        folder.write_bytes("committed", line.encode())
        print("committed", flush=True)
"""


def writer(url: str, options: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url, json.dumps(options or {})], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("held")
    return proc


def record(folder: Store) -> dict:
    return folder.read_json(LEASE)


def test_one_writer_at_a_time_and_fences_grow(tmp_path):
    folder = Store(str(tmp_path / "out"))
    with Lease(folder, QUICK, "first") as fence:
        assert fence.number == 1 and record(folder)["command"] == "first"
        with pytest.raises(LeaseHeld, match=r"held by first \(pid \d+ on .*, fence 1\) since"):
            Lease(folder, QUICK, "second").__enter__()
        fence.check("a commit")
        before = record(folder)["renewed"]
        deadline = time.monotonic() + 10 * QUICK.heartbeat_s
        while record(folder)["renewed"] == before and time.monotonic() < deadline:  # the heartbeat renews it
            time.sleep(0.05)
        assert record(folder)["renewed"] > before
    assert record(folder)["released"]
    with Lease(folder, QUICK, "third") as fence:  # a released lease is taken at once, its fence one higher
        assert fence.number == 2


def test_a_writer_paused_past_its_ttl_is_taken_over_and_cannot_commit(tmp_path):
    folder = Store(str(tmp_path / "out"))
    paused = writer(folder.url)
    paused.stdin.write("first\n")
    paused.stdin.flush()
    assert paused.stdout.readline().strip() == "committed"
    os.kill(paused.pid, signal.SIGSTOP)  # alive on this host, but its heartbeat stops
    try:
        started = time.monotonic()
        with pytest.raises(LeaseHeld):
            Lease(folder, QUICK, "successor").__enter__()  # not yet: its TTL runs
        with Lease(folder, QUICK.model_copy(update={"wait": True}), "successor") as fence:
            waited = time.monotonic() - started
            assert fence.number == 2 and 2.0 <= waited < 2.0 + 1.0
            folder.write_bytes("committed", b"successor\n")
            os.kill(paused.pid, signal.SIGCONT)
            paused.stdin.write("late\n")  # the paused writer wakes up and tries to commit
            paused.stdin.flush()
            answer = paused.stdout.readline()
            assert answer.startswith("refused") and "held by successor" in answer
            assert paused.wait(timeout=30) == 3
            assert folder.read_bytes("committed") == b"successor\n"
            fence.check("the successor's commit")
    finally:
        if paused.poll() is None:
            os.kill(paused.pid, signal.SIGCONT)
            paused.kill()


def test_a_dead_writers_lease_is_taken_over_at_once_on_its_host(tmp_path):
    folder = Store(str(tmp_path / "out"))
    dead = writer(folder.url)
    dead.kill()
    dead.wait()
    with Lease(folder, LeaseConfig(ttl_s=3600, heartbeat_s=10), "next") as fence:  # its pid is gone
        assert fence.number == 2


def test_on_s3_exactly_one_of_several_takers_wins_and_a_lost_lease_refuses(s3_options):
    import s3fs

    s3fs.S3FileSystem(**s3_options["s3"]).mkdir("leases")
    folder = Store("s3://leases/out", s3_options)
    holder = writer(folder.url, s3_options)
    holder.kill()  # on S3, from this host's point of view: its pid is gone, so it is expired at once
    holder.wait()
    takers = [Lease(folder, QUICK, f"taker-{i}") for i in range(4)]
    won = []
    for lease in takers:
        with contextlib.suppress(LeaseHeld):
            won.append(lease.__enter__())
    assert [f.number for f in won] == [2]
    winner = next(lease for lease in takers if lease.fence is not None)
    with pytest.raises(LeaseLost):  # a stale writer's fence (number 1) is refused
        type(won[0])(folder, "someone-else", 1).check("a commit")
    winner.__exit__(None, None, None)
    assert record(folder)["released"] and record(folder)["fence"] == 2


def test_a_lease_being_created_is_never_read_half_written(tmp_path):
    """A refresh that loses the race for a new folder reads the winner's lease at once: it must
    find it whole (and exit 75), never empty (which once ended a loser with a traceback)."""
    import threading

    store, data = Store(str(tmp_path)), json.dumps({"token": "x" * 4000}).encode()
    seen, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.append(store.read_bytes(LEASE))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(300):
            assert store.create_exclusive(LEASE, data) and not store.create_exclusive(LEASE, data)
            os.remove(tmp_path / LEASE)
    finally:
        stop.set()
        reader.join()
    assert seen and all(s == data for s in seen), {len(s) for s in seen}
    assert sorted(os.listdir(tmp_path)) == []  # no partial files left behind
