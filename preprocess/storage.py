"""fsspec access shared by the stages: URLs, per-protocol options, batched reads, commits."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs


def filesystem(url: str, storage_options: dict[str, dict]) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; storage_options are keyed by protocol ('s3': {...})."""
    protocol = split_protocol(url)[0] or "file"
    return url_to_fs(url, **storage_options.get(protocol, {}))


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


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name, then rename, so readers never see a partial file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_atomic(fs, path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path))


def iter_shard(url: str, storage_options: dict, select=None):
    """Samples of a WebDataset tar on any fsspec URL, through webdataset's own tar iterators.

    select(member_name) -> bool skips the bytes of members that are not needed."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as stream:
        files = tar_file_iterator(stream, select_files=select)
        yield from group_by_keys({**f, "__url__": url} for f in files)
