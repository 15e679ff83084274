"""The store on its own: names below its root, transient errors told from permanent ones and
retried in every path the stages use (its own calls, streamed reads, batched reads, pyarrow,
DuckDB), each retry counted; an exclusive create whose answer was lost is still its own."""

import errno
import functools
import uuid

import botocore.exceptions
import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from tessera.core.storage import ATTEMPTS, Store, counting_retries, is_transient


def flaky(method, after: bool = False):
    """METHOD failing now and then (AFTER doing its work, with `lose_answer`); the calls it
    makes itself (find's infos) never do, so every call that is made again can succeed."""

    def call(self, *args, **kwargs):
        late = after and self.lose_answer
        if not self.depth and not late:
            self.fault()
        self.depth += 1
        try:
            result = method(self, *args, **kwargs)
        finally:
            self.depth -= 1
        if not self.depth and late:
            self.fault()
        return result

    return call


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose every EVERY-th call (reads of open files included) fails
    with a transient error; with LOSE_ANSWER, a write fails after it was made. A listing of one
    folder (`ls`) fails as an object store's does: fsspec's generic walk (its glob) takes a failed
    `ls` for an empty folder, so the store must not list through it."""

    protocol = "flaky"

    def __init__(self, every: int = 3, lose_answer: bool = False, run: str = "", **kwargs):
        super().__init__(**kwargs)
        self.every, self.lose_answer, self.calls, self.faults, self.depth = every, lose_answer, 0, 0, 0

    def fault(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            self.faults += 1
            raise (ConnectionResetError, TimeoutError, lambda: OSError(errno.EBUSY, "SlowDown"))[self.faults % 3]()

    info = flaky(MemoryFileSystem.info)
    find = flaky(MemoryFileSystem.find)
    ls = flaky(MemoryFileSystem.ls)
    cat_file = flaky(MemoryFileSystem.cat_file)
    pipe_file = flaky(MemoryFileSystem.pipe_file, after=True)
    mv = flaky(MemoryFileSystem.mv)  # (fsspec's generic mv takes a failed isdir for "not a folder")

    @flaky
    def _open(self, path, mode="rb", **kwargs):
        opened = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            return opened
        fs = self

        class FlakyFile(MemoryFile):
            def read(self, size=-1):
                fs.fault()
                return super().read(size)

        return FlakyFile(fs, path, opened.getvalue())


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr("tessera.core.storage.WAIT_FIRST_S", 0.001)
    monkeypatch.setattr("tessera.core.storage.WAIT_MAX_S", 0.002)
    monkeypatch.setattr("tessera.core.storage.RETRY_FOR_S", 0.0)


def flaky_store(**options) -> Store:
    run = uuid.uuid4().hex  # a filesystem instance (and a folder) of its own
    return Store(f"flaky://{run}/out", {"flaky": {"run": run, **options}})


def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                                           "GetObject")


def wrapped(cause: BaseException, outer: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("error", [
    TimeoutError("read timed out"), ConnectionResetError(), OSError(errno.ETIMEDOUT, "timed out"),
    OSError(errno.EBUSY, "SlowDown"),  # what s3fs makes of 503 SlowDown
    wrapped(client_error(503, "SlowDown"), OSError(errno.EIO, "Please reduce your request rate")),
    client_error(500, "InternalError"), client_error(429, "TooManyRequests"),
    client_error(400, "RequestTimeout"), client_error(400, "ThrottlingException"),
    botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    wrapped(ConnectionResetError(), RuntimeError("while reading")),
])
def test_transient_errors(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    FileNotFoundError("gone"), PermissionError("403"), FileExistsError("there"), ValueError("bad"),
    client_error(404, "NoSuchKey"), client_error(403, "AccessDenied"), OSError(errno.EINVAL, "bad range"),
    wrapped(client_error(503, "SlowDown"), FileNotFoundError("a 404 after a 503 is a 404")),
])
def test_permanent_errors(error):
    assert not is_transient(error)


def test_names_stay_below_the_root(tmp_path):
    store = Store(str(tmp_path))
    for name in ("../escape", "a/../../b", "/etc/passwd", "s3://other/x"):
        with pytest.raises(ValueError, match="not a name below"):
            store.read_bytes(name)
    assert store.child("a", "b").url == str(tmp_path / "a" / "b") and store.at("s3://x/y").url == "s3://x/y"


def test_every_path_the_stages_use_survives_transient_errors_and_counts_each_retry(fast_retries):
    store = flaky_store(every=3)
    fs = store._fs
    with counting_retries() as retried:
        exercise(store)
    assert fs.faults >= 10 and retried.value == fs.faults


def exercise(store: Store) -> None:
    """Every path the stages use: each call, a stream read in pieces, a batched read, an
    atomic write, pyarrow and DuckDB reading through the store."""
    store.write_json("a/one.json", {"n": 1})
    store.write_bytes("a/two.bin", bytes(range(256)) * 64)
    assert store.read_json("a/one.json") == {"n": 1}
    assert store.names("a/*") == ["a/one.json", "a/two.bin"] and store.exists("a/two.bin")
    assert store.size("a/two.bin") == 16384 and set(store.infos()) == {"a/one.json", "a/two.bin"}
    with store.open("a/two.bin") as f:  # a stream read in pieces: a failed read is read again
        pieces = [f.read(1000) for _ in range(17)]
    assert b"".join(pieces) == bytes(range(256)) * 64
    got = store.read_many([store.url_of("a/one.json"), store.url_of("a/two.bin"), store.url_of("a/missing")])
    assert got[store.url_of("a/two.bin")] == bytes(range(256)) * 64
    assert isinstance(got[store.url_of("a/missing")], FileNotFoundError)  # returned, not retried
    with store.writing("a/streamed.bin") as f:
        f.write(b"written whole, then committed")
    assert store.read_bytes("a/streamed.bin") == b"written whole, then committed"
    store.write_parquet("t/part-0.parquet", pa.table({"k": list(range(100))}))
    assert store.read_parquet("t/part-0.parquet", ["k"]).column("k").to_pylist() == list(range(100))  # pyarrow
    with store.duckdb() as (con, _):
        assert con.execute(f"SELECT sum(k) FROM read_parquet('{store.url_of('t', '*.parquet')}')").fetchall() \
            == [(4950,)]


def test_an_error_that_persists_is_raised_after_its_attempts_and_a_permanent_one_at_once(fast_retries):
    store = flaky_store(every=1)  # every call fails
    with counting_retries() as retried, pytest.raises((ConnectionResetError, TimeoutError, OSError)):
        store.read_bytes("anything")
    assert store._fs.faults == ATTEMPTS and retried.value == ATTEMPTS - 1
    calm = Store(f"memory://{uuid.uuid4().hex}")
    with counting_retries() as retried, pytest.raises(FileNotFoundError):
        calm.read_bytes("missing")
    assert retried.value == 0


def test_a_folder_that_cannot_be_listed_is_not_taken_for_an_empty_one(fast_retries):
    """A listing that keeps failing raises: committed files taken for missing would be written
    again, or reported damaged."""
    store = flaky_store(every=1)
    store._fs.find = functools.partial(MemoryFileSystem.find, store._fs)  # a walk whose folder listings fail
    calm = Store(store.url.replace("flaky://", "memory://"))  # the same files, no faults
    calm.write_bytes("rejects/shard-000000.parquet", b"x")
    assert calm.names("rejects/*") == ["rejects/shard-000000.parquet"]
    for listing in (lambda: store.names("rejects/*"), lambda: store.infos("rejects/*.parquet"),
                    lambda: store.names("*/shard-*")):
        with pytest.raises((ConnectionResetError, TimeoutError, OSError)):
            listing()


def test_retries_are_counted_in_their_own_scope_only(fast_retries):
    """A stage's retries are its own: a lease heartbeat's (another thread, in no stage's scope)
    and another scope's are not counted in it."""
    import threading

    store, other = flaky_store(every=3), flaky_store(every=3)
    with counting_retries() as stage:
        beat = threading.Thread(target=lambda: [other.write_bytes(f"beat-{i}", b"x") for i in range(4)])
        beat.start()
        for i in range(4):
            store.write_bytes(f"own-{i}", b"y")
        beat.join()
        with counting_retries() as inner:
            store.read_bytes("own-0")
    assert other._fs.faults >= 2 and stage.value == store._fs.faults - inner.value and inner.value >= 0


def test_an_exclusive_create_whose_answer_was_lost_is_its_own(fast_retries):
    store = flaky_store(every=2, lose_answer=True)  # the write lands, then its answer is lost
    assert store.create_exclusive("lock", b"token-1")  # the retry finds its own bytes there
    assert store._fs.faults >= 1
    store._fs.every = 10**9
    assert not store.create_exclusive("lock", b"token-2")  # someone else's: refused
    assert store.read_bytes("lock") == b"token-1"


def test_an_exclusive_create_on_disk_is_refused_the_second_time(tmp_path):
    store = Store(str(tmp_path))
    assert store.create_exclusive("dir/lock", b"a") and not store.create_exclusive("dir/lock", b"b")
    assert (tmp_path / "dir" / "lock").read_bytes() == b"a"
