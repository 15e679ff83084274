"""The ground floor every package stands on: `Store`, a folder (or one file) on any fsspec
filesystem, built once from a URL and the config's storage options and handed down. Nothing
above this module builds a filesystem or sees the options.

- Names are relative to the store's root (the shape of fsspec's DirFileSystem): `child` is
  the store of a sub-folder, `at` the store of another URL with the same options.
- Writes are atomic. On local disks a temporary name is written, then renamed; object
  stores, whose single PUT is atomic (and where a rename is a copy), are written in place.
  `create_exclusive` is O_EXCL on disks and a conditional put (If-None-Match: *) on S3.
- Transient errors — timeouts, throttling, connection resets, 5xx — are retried with
  exponential backoff and jitter (tenacity) here and nowhere else: the store's own calls,
  streamed reads (`open`), and what pyarrow (`dataset`, `read_parquet`) and DuckDB (`duckdb`)
  do through it. Lance retries in its own object-store client. `counting_retries()` counts the
  retries of a scope (a stage run, a Ray task); stage summaries report them as `store_retries`.
- A store pickles as (url, options): Ray tasks take one and rebuild it where they run; a
  process forked from one that holds a store builds its own filesystem on first use."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import tenacity
from fsspec import AbstractFileSystem
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from tessera.core.errors import OutOfSpace

log = logging.getLogger(__name__)

DUCKDB_MEMORY_LIMIT = "256MB"  # of every DuckDB query (they spill to local scratch beyond it)
ATTEMPTS = 8  # tries of one call before its transient error is raised, and no sooner than
RETRY_FOR_S = 30.0  # after this long (full jitter alone may spend all its tries in a few seconds)
WAIT_FIRST_S, WAIT_MAX_S = 0.25, 15.0  # exponential backoff with full jitter between them
# where one PUT is atomic and a rename is a copy: written in place
IN_PLACE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
                     errno.EAGAIN, errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}
# error codes of throttling and of a server having trouble (S3 and its kin)
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable", "InternalError",
                    "RequestTimeout", "RequestTimeTooSkewed"}
# the HTTP clients' transport errors (botocore, aiohttp, urllib3, http.client), by class name so
# that no client has to be importable
_TRANSIENT_CLASSES = {"ConnectionError", "HTTPClientError", "ClientConnectionError", "ClientPayloadError",
                      "ServerTimeoutError", "ProtocolError", "IncompleteRead", "IncompleteReadError",
                      "ResponseStreamingError"}
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def out_of_space(error: BaseException) -> OutOfSpace | None:
    """ERROR as OutOfSpace when it (or what caused it) is ENOSPC / EDQUOT, naming the file."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OutOfSpace):  # (Ray raises a task's error as a RayTaskError with its `cause`)
            cause = getattr(error, "cause", None)
            return cause if isinstance(cause, OutOfSpace) else error
        if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
            what = "no space left on the device" if error.errno == errno.ENOSPC else "disk quota exceeded"
            return OutOfSpace(what + (f" writing {error.filename}" if error.filename else ""))
        error = error.__cause__ or error.__context__
    return None


def _http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status = getattr(error, "status", None)  # aiohttp's ClientResponseError
    return status if isinstance(status, int) else getattr(response, "status_code", None)


def is_transient(error: BaseException) -> bool:
    """Whether ERROR (or what caused it) is one that goes away when the call is made again."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _PERMANENT):
            return False
        if isinstance(error, TimeoutError | ConnectionError):
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        status = _http_status(error)
        if status is not None and (status >= 500 or status == 429):
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
            return True
        if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


class RetryCount:
    """Store calls retried within a scope (`counting_retries`)."""

    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


# the scope a retry is counted in: a stage run or a Ray task (its context), never the process,
# so a lease heartbeat's retries (its own thread, its own context) are nobody's stage's
_SCOPE: contextvars.ContextVar[RetryCount | None] = contextvars.ContextVar("tessera_store_retries", default=None)
_UNSCOPED = RetryCount()  # retries outside any scope (a lease heartbeat's): counted for no stage


@contextlib.contextmanager
def counting_retries() -> Iterator[RetryCount]:
    """Count the store calls retried in this context (and in threads the store starts from it)
    while the block runs."""
    count = RetryCount()
    token = _SCOPE.set(count)
    try:
        yield count
    finally:
        _SCOPE.reset(token)


@contextlib.contextmanager
def _scoped(scope: RetryCount | None) -> Iterator[None]:
    """Count retries in SCOPE here: for calls made from a library's own threads (DuckDB's,
    pyarrow's I/O pool), which are in no scope of ours."""
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def in_context(pool: ThreadPoolExecutor, fn: Callable, *args):
    """POOL.submit of FN in a copy of this context: its retries are counted where they belong."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


def _before_retry(state: tenacity.RetryCallState) -> None:
    (_SCOPE.get() or _UNSCOPED).add()
    log.info("store: %s (attempt %d), retrying in %.1f s", state.outcome.exception(), state.attempt_number,
             state.next_action.sleep)


def retried(call: Callable, *args, **kwargs):
    """CALL(*ARGS, **KWARGS), made again after a transient error (backoff with jitter)."""
    return tenacity.Retrying(stop=tenacity.stop_after_attempt(ATTEMPTS) & tenacity.stop_after_delay(RETRY_FOR_S),
                             wait=tenacity.wait_random_exponential(multiplier=WAIT_FIRST_S, max=WAIT_MAX_S),
                             retry=tenacity.retry_if_exception(is_transient), before_sleep=_before_retry,
                             reraise=True)(call, *args, **kwargs)


class _Unfinished(Exception):
    """Some files of a batched read failed transiently (the cause): read those again."""


class _RetryingReader(io.RawIOBase):
    """A file open for reading whose reads survive transient errors: after one, the file is
    opened again and read from the same position."""

    def __init__(self, opener: Callable[[], BinaryIO]):
        super().__init__()
        self._opener = opener
        self._scope = _SCOPE.get()  # the scope its retries count in, whichever thread reads it
        self._file: BinaryIO | None = retried(opener)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        with _scoped(self._scope):
            self._position = retried(self._seek, offset, whence)
        return self._position

    def _current(self) -> BinaryIO:
        if self._file is None:
            self._file = self._opener()
            self._file.seek(self._position)
        return self._file

    def _seek(self, offset: int, whence: int) -> int:
        if whence == io.SEEK_CUR:
            offset, whence = self._position + offset, io.SEEK_SET
        return self._current().seek(offset, whence)

    def _read(self, size: int) -> bytes:
        try:
            return self._current().read(size)
        except BaseException:
            self._discard()  # a stream that failed is not read again: the next attempt reopens it
            raise

    def _discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

    def read(self, size: int = -1) -> bytes:
        with _scoped(self._scope):
            data = retried(self._read, size)
        self._position += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._discard()
        super().close()


def _glob(fs: AbstractFileSystem, pattern: str) -> dict[str, dict]:
    """What the glob PATTERN (a path of FS) matches, by path, listed one folder level per part of
    the pattern. A listing that fails raises (after its retries): fsspec's own glob walks with
    listing errors omitted, and a folder that could not be listed must not be taken for an empty
    one (its committed files for missing ones)."""
    if "**" in pattern:
        raise ValueError(f"{pattern!r}: a pattern matches one folder level per part ('**' is not taken)")
    parts = fs._strip_protocol(pattern).split("/")
    fixed = next(i for i, part in enumerate([*parts, "*"]) if glob.has_magic(part))
    if fixed == len(parts):  # no wildcard: the path itself
        try:
            return {"/".join(parts): retried(fs.info, "/".join(parts))}
        except FileNotFoundError:
            return {}
    level = {"/".join(parts[:fixed]) or fs.root_marker: {"type": "directory"}}
    for depth, part in enumerate(parts[fixed:], fixed):
        last, found = depth == len(parts) - 1, {}
        for folder in level:
            if not glob.has_magic(part):
                path = f"{folder.rstrip('/')}/{part}"
                with contextlib.suppress(FileNotFoundError):
                    found[path] = retried(fs.info, path) if last else {"type": "directory"}
                continue
            try:
                listing = retried(fs.ls, folder, detail=True)
            except FileNotFoundError:
                continue
            found.update({entry["name"].rstrip("/"): entry for entry in listing
                          if fnmatch.fnmatchcase(entry["name"].rstrip("/").rsplit("/", 1)[-1], part)
                          and (last or entry["type"] == "directory")})
        level = found
    return level


class _RetryingFileSystem(AbstractFileSystem):
    """A store's filesystem as the libraries that take an fsspec filesystem see it (pyarrow,
    DuckDB): each call retried on transient errors, files opened for reading retrying theirs.
    Files opened for writing are the wrapped filesystem's own (the store writes whole files)."""

    cachable = False

    def __init__(self, fs: AbstractFileSystem):
        super().__init__()
        self.fs = fs
        self.protocol = fs.protocol
        self._scope = _SCOPE.get()  # the scope its retries count in, whichever thread calls it

    def open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            with _scoped(self._scope):
                return _RetryingReader(lambda: self.fs.open(path, "rb", **kwargs))
        return self.fs.open(path, mode, **kwargs)

    def glob(self, path, maxdepth=None, **kwargs):
        with _scoped(self._scope):
            found = _glob(self.fs, path)
        return found if kwargs.get("detail") else sorted(found)

    def _type(self, path) -> str | None:
        """What PATH is (from `info`, retried: fsspec's own exists / isdir / isfile answer no
        for any error); None when it is not there."""
        try:
            return self.info(path)["type"]
        except FileNotFoundError:
            return None

    def exists(self, path, **kwargs) -> bool:
        return self._type(path) is not None

    def isdir(self, path) -> bool:
        return self._type(path) == "directory"

    def isfile(self, path) -> bool:
        return self._type(path) == "file"


def _delegate(name: str):
    def call(self, *args, **kwargs):
        with _scoped(self._scope):
            return retried(getattr(self.fs, name), *args, **kwargs)

    call.__name__ = name
    return call


for _name in ("info", "ls", "listdir", "find", "size", "modified", "created", "ukey", "checksum",
              "cat_file", "cat", "pipe_file", "put_file", "get_file", "rm", "rm_file", "mv", "copy", "cp_file",
              "mkdir", "makedirs"):
    setattr(_RetryingFileSystem, _name, _delegate(_name))


def _precondition_failed(error: BaseException) -> bool:
    """Whether ERROR is a conditional write's refusal (HTTP 412)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)
        if _http_status(error) == 412 or (isinstance(response, dict) and
                                          response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_local(url: str) -> bool:
    return split_protocol(url)[0] in (None, "file", "local")


def absolute(url: str) -> str:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    return url if split_protocol(url)[0] else os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    protocol, path = split_protocol(base)
    joined = posixpath.join(path, *parts)
    return f"{protocol}://{joined}" if protocol else joined


def resolve(base_dir: str, path: str) -> str:
    """A manifest path: absolute paths and URLs as given, others relative to base_dir."""
    if split_protocol(path)[0] or path.startswith("/"):
        return path
    protocol, base = split_protocol(base_dir)
    joined = posixpath.normpath(posixpath.join(base, path))
    return f"{protocol}://{joined}" if protocol else joined


def parent(url: str) -> str:
    protocol, path = split_protocol(url)
    folder = posixpath.dirname(path.rstrip("/"))
    return f"{protocol}://{folder}" if protocol else folder


def file_tag(info: dict) -> str:
    """What changes when a file changes, from its metadata alone: ETag / version id on object
    stores, modification time on disks."""
    for field in ("ETag", "etag", "VersionId", "version_id", "generation", "mtime", "LastModified", "created"):
        if info.get(field) is not None:
            return f"{info['size']}:{info[field]}"
    raise ValueError(f"{info.get('name')}: the store gives no ETag, version or modification time")


def parquet_bytes(table, **options) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, **options)
    return buf.getvalue()


class Store:
    """A folder (or one file) on any fsspec filesystem; see the module doc."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = absolute(url).rstrip("/") or "/"
        self._options = storage_options or {}
        self._protocol = split_protocol(self.url)[0] or "file"
        self._owner_pid: int | None = None
        fs = self._fs
        self.is_local = isinstance(fs, LocalFileSystem)
        self._in_place = self._protocol in IN_PLACE_PROTOCOLS
        self._s3 = "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)

    @property
    def _fs(self) -> AbstractFileSystem:
        """This process's filesystem instance: built again in a process the store reaches by
        fork (DataLoader workers, multiprocessing), since async filesystems such as s3fs hold an
        event loop that belongs to the process that made them (and refuse to be used after a
        fork). fsspec's own instance cache is per process too."""
        if self._owner_pid != os.getpid():
            options = self._options.get(self._protocol, {})
            if self._protocol in IN_PLACE_PROTOCOLS:
                # no listings cached across calls: another process rewrites files (an index part
                # marked), and a stale listing's ETag makes reading the new object fail (s3fs
                # opens with If-Match) however often it is retried
                options = {"use_listings_cache": False, **options}
            self._filesystem, self._root = url_to_fs(self.url, **options)
            self._owner_pid = os.getpid()
        return self._filesystem

    def __reduce__(self):
        return Store, (self.url, self._options)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # --- where ---------------------------------------------------------------------------

    def _path(self, name: str = "") -> str:
        """The filesystem's own path of NAME (below the root; '' is the root itself)."""
        if not name:
            return self._root
        if name.startswith("/") or "://" in name or ".." in name.split("/"):
            raise ValueError(f"{name!r} is not a name below {self.url}")
        return posixpath.join(self._root, name)

    def _relative(self, path: str) -> str:
        prefix = self._root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path

    def local_path(self, name: str = "") -> str:
        """Where NAME is on this machine's disk (a local store only: for programs that write
        folders themselves, such as DeepSpeed)."""
        if not self.is_local:
            raise ValueError(f"{self.url} is not on a local disk")
        return self._path(name)

    def url_of(self, *names: str) -> str:
        return join(self.url, *names) if names else self.url

    def sql_url(self, *names: str) -> str:
        """url_of as an SQL string literal (DuckDB's read_parquet): quoted, its quotes doubled."""
        return "'" + self.url_of(*names).replace("'", "''") + "'"

    def child(self, *names: str) -> Store:
        return Store(self.url_of(*names), self._options)

    def at(self, url: str) -> Store:
        """The store of another URL (a folder or a file), with this store's options."""
        return Store(url, self._options)

    # --- reading ---------------------------------------------------------------------------

    def exists(self, name: str = "") -> bool:
        """Whether NAME is there. (From `info`: fsspec's own `exists` answers False for any
        error, and a store that cannot answer must not be taken to say no.)"""
        try:
            self.info(name)
        except FileNotFoundError:
            return False
        return True

    def isdir(self, name: str = "") -> bool:
        try:
            return self.info(name)["type"] == "directory"
        except FileNotFoundError:
            return False

    def info(self, name: str = "") -> dict:
        return retried(self._fs.info, self._path(name))

    def size(self, name: str = "") -> int:
        return int(self.info(name)["size"])

    def read_bytes(self, name: str = "", start: int | None = None, end: int | None = None) -> bytes:
        return retried(self._fs.cat_file, self._path(name), start=start, end=end)

    def read_json(self, name: str = "") -> Any:
        return json.loads(self.read_bytes(name))

    def open(self, name: str = "") -> BinaryIO:
        """NAME open for reading, as a stream (webdataset's tar iterators, Parquet footers)."""
        path = self._path(name)
        return _RetryingReader(lambda: self._fs.open(path, "rb"))

    def names(self, pattern: str) -> list[str]:
        """Sorted names (relative to the root) of the files and folders matching a glob pattern
        such as 'index/*.parquet' or 'versions/v*/inputs.parquet'."""
        return sorted(self._matching(pattern))

    def infos(self, pattern: str | None = None) -> dict[str, dict]:
        """Metadata of the files matching PATTERN (default: every file below the root), by name."""
        found = self._matching(pattern) if pattern else {
            self._relative(p): info for p, info in retried(self._fs.find, self._root, detail=True).items()}
        return {name: info for name, info in found.items() if info.get("type") == "file"}

    def _matching(self, pattern: str) -> dict[str, dict]:
        return {self._relative(path): info for path, info in _glob(self._fs, self._path(pattern)).items()}

    def read_many(self, urls: list[str], limit: int | None = None) -> dict[str, bytes | Exception]:
        """Whole files named by URL, anywhere this store's options reach (a manifest's inputs),
        read concurrently where the filesystem batches reads (s3fs); errors returned per file,
        transient ones after retrying the files they hit. With LIMIT, no more than LIMIT + 1
        bytes of a file are read (a ranged read): a longer answer means a larger file."""
        by_protocol: dict[str, list[str]] = {}
        for url in urls:
            by_protocol.setdefault(split_protocol(url)[0] or "file", []).append(url)
        out: dict[str, bytes | Exception] = {}
        for group in by_protocol.values():
            fs = self.at(group[0])._fs
            paths = {url: fs._strip_protocol(url) for url in group}
            got = _cat_retrying(fs, list(dict.fromkeys(paths.values())), limit)
            out.update({url: got[path] for url, path in paths.items()})
        return out

    def get_file(self, name: str, local: str) -> None:
        """Download NAME to the local path LOCAL."""
        retried(self._fs.get_file, self._path(name), local)

    # --- writing ---------------------------------------------------------------------------

    def _atomic(self, name: str, write: Callable[[str], None]) -> None:
        path = self._path(name)

        def attempt() -> None:
            if self._in_place:
                write(path)
                return
            if self.is_local:  # object stores have no folders to make
                self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                write(tmp)
                self._fs.mv(tmp, path)
            except BaseException:  # nothing half-written left behind (a full disk, a kill)
                with contextlib.suppress(Exception):
                    self._fs.rm_file(tmp)
                raise

        retried(attempt)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._atomic(name, lambda path: self._fs.pipe_file(path, data))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def write_parquet(self, name: str, table, **options) -> None:
        self.write_bytes(name, parquet_bytes(table, **options))

    def put_file(self, local: str, name: str) -> None:
        """Copy the local file LOCAL to NAME."""
        self._atomic(name, lambda path: self._fs.put_file(local, path))

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[BinaryIO]:
        """A file to write NAME through, committed when the block ends (and dropped when it
        raises): on local disk a temporary name beside NAME, then renamed; elsewhere a local
        scratch file, then uploaded (with retries)."""
        if self.is_local:
            path = self._path(name)
            self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        else:
            handle, tmp = tempfile.mkstemp(prefix="tessera-upload-")
            os.close(handle)
        try:
            with open(tmp, "wb") as f:
                yield f
            if self.is_local:
                os.replace(tmp, path)
            else:
                self.put_file(tmp, name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def makedirs(self, name: str = "") -> None:
        retried(self._fs.makedirs, self._path(name), exist_ok=True)

    def remove(self, name: str, recursive: bool = False) -> None:
        retried(self._fs.rm, self._path(name), recursive=recursive)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create NAME only if it does not exist, atomically: False when it already does.

        Local disks link a complete file (fails when NAME exists); S3 a conditional put
        (If-None-Match: *). Other stores have no such primitive in fsspec: there it is a check,
        then a write (documented). A put whose
        answer was lost and that is retried finds the object there: it is its own when it
        holds DATA (callers put a unique token in it)."""
        path = self._path(name)
        attempts = RetryCount()

        def attempt() -> None:
            attempts.add()
            if self.is_local:  # written whole first, then linked: a reader never sees it empty
                os.makedirs(posixpath.dirname(path), exist_ok=True)
                partial = f"{path}.{uuid.uuid4().hex}.partial"
                with open(partial, "wb") as f:
                    f.write(data)
                try:
                    os.link(partial, path)  # fails when NAME exists, as O_EXCL does
                finally:
                    os.remove(partial)
            elif self._s3:
                self._fs.pipe_file(path, data, mode="create")
            else:
                if self._fs.exists(path):
                    raise FileExistsError(path)
                self._fs.pipe_file(path, data)

        try:
            retried(attempt)
        except FileExistsError:
            return attempts.value > 1 and self.read_bytes(name) == data
        return True

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        """NAME's bytes and a tag of that version, for `replace_if` (its ETag on S3, taken before
        the read: a write in between makes the tag stale, and the replace is refused)."""
        if self._s3:  # (refresh: s3fs would answer from a listing it cached)
            tag = retried(self._fs.info, self._path(name), refresh=True)["ETag"]
            return self.read_bytes(name), tag
        data = self.read_bytes(name)
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, name: str, data: bytes, tag: str) -> str | None:
        """Compare and swap: write DATA to NAME only if NAME is still the version TAG; the new
        version's tag, or None when another writer changed it first. S3: a conditional put
        (If-Match); local disks: under an exclusive lock (flock of NAME.lock); other stores: a
        check, then a write (documented: not safe between concurrent writers)."""
        path = self._path(name)
        if self._s3:
            try:
                return retried(self._fs.pipe_file, path, data, IfMatch=tag)["ETag"]
            except OSError as error:
                if _precondition_failed(error):
                    return None
                raise
        if self.is_local:
            with open(f"{path}.lock", "ab") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                return self._replace_if_unchanged(name, data, tag)
        return self._replace_if_unchanged(name, data, tag)

    def _replace_if_unchanged(self, name: str, data: bytes, tag: str) -> str | None:
        try:
            current = self.read_bytes(name)
        except FileNotFoundError:
            return None
        if hashlib.sha256(current).hexdigest() != tag:
            return None
        self.write_bytes(name, data)
        return hashlib.sha256(data).hexdigest()

    # --- what libraries take -------------------------------------------------------------

    def _arrow_filesystem(self):
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(_RetryingFileSystem(self._fs)))

    def arrow_location(self, name: str = ""):
        """(pyarrow filesystem, its path of NAME): for libraries that take a pyarrow filesystem
        (Ray Tune's experiment state), reaching the store with its options and retries."""
        return self._arrow_filesystem(), self._path(name)

    def dataset(self, files: str | list[str], schema=None):
        """The Parquet files matching a glob pattern (or named in a list) as one pyarrow dataset
        (None when there are none), for column-projected, filtered scans that never load the
        whole table."""
        import pyarrow.dataset as ds

        paths = [self._path(name) for name in (self.names(files) if isinstance(files, str) else files)]
        if not paths:
            return None
        return ds.dataset(paths, schema=schema, format="parquet", filesystem=self._arrow_filesystem())

    def read_parquet(self, name: str, columns: list[str] | None = None, where=None, schema=None):
        """One Parquet file as a table: only COLUMNS, only the rows WHERE (a dataset expression)
        selects, read as SCHEMA (its columns in that order) when given."""
        table = self.dataset([name], schema=schema).to_table(columns=columns, filter=where)
        return table.select(columns) if columns else table

    @contextlib.contextmanager
    def duckdb(self) -> Iterator[tuple[Any, str]]:
        """(connection, scratch folder): a DuckDB connection that reads this store's files by URL
        (its filesystem registered for object stores, retrying), memory-limited to
        DUCKDB_MEMORY_LIMIT and spilling to the scratch folder (local, removed afterwards, also
        where a query writes the files it then puts on the store)."""
        import duckdb

        with tempfile.TemporaryDirectory(prefix="tessera-duckdb-") as scratch, duckdb.connect() as con:
            con.execute(f"SET memory_limit='{DUCKDB_MEMORY_LIMIT}'; SET temp_directory='{scratch}'; "
                        "SET preserve_insertion_order=false; SET enable_progress_bar=false")
            if not self.is_local:
                con.register_filesystem(_RetryingFileSystem(self._fs))
            yield con, scratch

    def lance_kwargs(self) -> dict[str, dict[str, str]]:
        """The keyword arguments Lance's functions take to reach this store: its fsspec options
        as Lance's object_store names them (S3 keys, endpoint, region; other protocols' options
        as they are)."""
        protocol = split_protocol(self.url)[0] or "file"
        given = dict(self._options.get(protocol, {}))
        if protocol not in ("s3", "s3a"):
            return {"storage_options": {k: str(v) for k, v in given.items()}}
        client = given.pop("client_kwargs", {}) or {}
        names = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token"}
        out = {name: str(given[key]) for key, name in names.items() if given.get(key)}
        if client.get("endpoint_url"):
            out["aws_endpoint"] = client["endpoint_url"]
            out["allow_http"] = str(client["endpoint_url"].startswith("http://")).lower()
        out["aws_region"] = client.get("region_name") or os.environ.get("AWS_REGION", "us-east-1")
        return {"storage_options": out}


def _cat_retrying(fs: AbstractFileSystem, paths: list[str], limit: int | None) -> dict[str, bytes | Exception]:
    """fs.cat of PATHS (their first LIMIT + 1 bytes), errors per file; the files that failed
    transiently are read again."""
    got: dict[str, bytes | Exception] = {}
    pending = list(paths)

    def attempt() -> None:
        if limit is None:
            found = fs.cat(pending, on_error="return")
            if not isinstance(found, dict):  # a single path comes back bare
                found = {pending[0]: found}
        else:
            found = dict(zip(pending, fs.cat_ranges(pending, [0] * len(pending), [limit + 1] * len(pending),
                                                    on_error="return"), strict=True))
        for path in pending:
            got[path] = found.get(path, FileNotFoundError(path))
        failed = [p for p in pending if isinstance(got[p], Exception) and is_transient(got[p])]
        if failed:
            pending[:] = failed
            raise _Unfinished(f"{len(failed)} of the files failed") from got[failed[0]]

    with contextlib.suppress(_Unfinished):  # what still fails keeps its error
        retried(attempt)
    return got
