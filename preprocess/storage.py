"""fsspec access shared by the stages: URLs, per-protocol options, batched reads, commits.

`Store` is a folder on any filesystem (local disk, S3, ...): the stages take one instead of
threading URLs and storage options through every call."""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str, storage_options: dict[str, dict]) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; storage_options are keyed by protocol ('s3': {...})."""
    protocol = split_protocol(url)[0] or "file"
    return url_to_fs(url, **storage_options.get(protocol, {}))


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


def read_many(urls: list[str], storage_options: dict[str, dict]) -> dict[str, bytes | Exception]:
    """Read files, concurrently where the store allows (s3fs batches cat); errors returned per file."""
    by_protocol: dict[str, list[str]] = {}
    for url in urls:
        by_protocol.setdefault(split_protocol(url)[0] or "file", []).append(url)
    out: dict[str, bytes | Exception] = {}
    for group in by_protocol.values():
        fs, _ = filesystem(group[0], storage_options)
        paths = [fs._strip_protocol(u) for u in group]
        got = fs.cat(paths, on_error="return")
        if not isinstance(got, dict):  # a single path comes back bare
            got = {paths[0]: got}
        for url, path in zip(group, paths, strict=True):
            out[url] = got.get(path, FileNotFoundError(path))
    return out


def file_tag(info: dict) -> str:
    """What changes when a file changes, from its metadata alone: ETag / version id on object
    stores, modification time on disks."""
    for field in ("ETag", "etag", "VersionId", "version_id", "generation", "mtime", "LastModified", "created"):
        if info.get(field) is not None:
            return f"{info['size']}:{info[field]}"
    raise ValueError(f"{info.get('name')}: the store gives no ETag, version or modification time")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes | None = None, local: str | None = None
                 ) -> None:
    """Write DATA (or copy the LOCAL file) under a temporary name, then rename, so readers
    never see a partial file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    if isinstance(fs, LocalFileSystem):  # object stores have no folders to make
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if local is None:
        fs.pipe_file(tmp, data)
    else:
        fs.put_file(local, tmp)
    fs.mv(tmp, path)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_atomic(fs, path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path))


def parquet_bytes(table, **options) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, **options)
    return buf.getvalue()


def duckdb_over(store: Store, scratch: str, memory_limit: str):
    """A DuckDB connection that reads STORE's files by URL (its fsspec filesystem registered
    for object stores), memory-limited, spilling to SCRATCH."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit='{memory_limit}'; SET temp_directory='{scratch}'; "
                "SET preserve_insertion_order=false; SET enable_progress_bar=false")
    if not is_local(store.url):
        con.register_filesystem(store.fs)
    return con


def iter_shard(url: str, storage_options: dict, select=None):
    """Samples of a WebDataset tar on any fsspec URL, through webdataset's own tar iterators.

    select(member_name) -> bool skips the bytes of members that are not needed."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as stream:
        files = tar_file_iterator(stream, select_files=select)
        yield from group_by_keys({**f, "__url__": url} for f in files)


class Store:
    """A folder on any fsspec filesystem. Names are relative to the folder; writes are atomic
    (temporary name, then rename). Pickles as (url, options), so Ray tasks can take one."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = absolute(url).rstrip("/")
        self.options = storage_options or {}
        self.fs, self.root = filesystem(self.url, self.options)

    def __reduce__(self):
        return Store, (self.url, self.options)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, *names: str) -> str:
        """The filesystem's own path of NAMES (what self.fs takes)."""
        return join(self.root, *names)

    def url_of(self, *names: str) -> str:
        return join(self.url, *names)

    def child(self, *names: str) -> Store:
        return Store(self.url_of(*names), self.options)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_json(self, name: str) -> Any:
        return read_json(self.fs, self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        write_atomic(self.fs, self.path(name), data)

    def put_file(self, local: str, name: str) -> None:
        write_atomic(self.fs, self.path(name), local=local)

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.fs, self.path(name), obj)

    def write_parquet(self, name: str, table, **options) -> None:
        self.write_bytes(name, parquet_bytes(table, **options))

    def makedirs(self, name: str = "") -> None:
        self.fs.makedirs(self.path(name) if name else self.root, exist_ok=True)

    def names(self, pattern: str) -> list[str]:
        """Sorted names (relative to the folder) matching a glob pattern such as 'index/*.parquet'."""
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in self.fs.glob(self.path(pattern)))

    def remove(self, name: str, recursive: bool = False) -> None:
        self.fs.rm(self.path(name), recursive=recursive)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create NAME only if it does not exist, atomically: False when it already does.

        Local disks use O_EXCL; S3 a conditional put (If-None-Match: *). Other stores have
        no such primitive in fsspec: there it is a check, then a write (documented)."""
        path = self.path(name)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        try:
            if is_local(self.url):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            elif "s3" in ((self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol):
                self.fs.pipe_file(path, data, mode="create")
            else:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
        except FileExistsError:
            return False
        return True

    def lance_options(self) -> dict[str, str]:
        """The store's fsspec options as Lance (object_store) takes them: S3 keys, endpoint,
        region; other protocols' options are passed as they are."""
        protocol = split_protocol(self.url)[0] or "file"
        given = dict(self.options.get(protocol, {}))
        if protocol not in ("s3", "s3a"):
            return {k: str(v) for k, v in given.items()}
        client = given.pop("client_kwargs", {}) or {}
        names = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token"}
        out = {name: str(given[key]) for key, name in names.items() if given.get(key)}
        if client.get("endpoint_url"):
            out["aws_endpoint"] = client["endpoint_url"]
            out["allow_http"] = str(client["endpoint_url"].startswith("http://")).lower()
        out["aws_region"] = client.get("region_name") or os.environ.get("AWS_REGION", "us-east-1")
        return out

    def arrow_filesystem(self):
        """The store as a pyarrow filesystem (pyarrow's own for local disk), for datasets."""
        import pyarrow.fs as pafs

        if is_local(self.url):
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def dataset(self, files: str | list[str], schema=None):
        """The Parquet files matching a glob pattern (or named in a list) as one pyarrow dataset
        (None when there are none), for column-projected, filtered scans that never load the
        whole table."""
        import pyarrow.dataset as ds

        files = [self.path(name) for name in (self.names(files) if isinstance(files, str) else files)]
        if not files:
            return None
        return ds.dataset(files, schema=schema, format="parquet", filesystem=self.arrow_filesystem())
