"""Which inputs a manifest may name. A manifest line is data, not an instruction: left alone,
`"text_file": "/etc/passwd"` would be read on a worker and stored in a shard, `../../other-bucket/`
would leave the manifest's bucket with the operator's credentials and `http://169.254.169.254/`
would reach a cloud metadata endpoint. Inputs must lie under the manifest's own folder (or
bucket prefix) or a root listed in `shard.inputs.allow`; anything else is a reject, never a read."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlsplit

from fsspec.core import split_protocol


def normalized(url: str) -> str:
    """The location URL names once `..`, `.` and (on local disk) symlinks are resolved, so that
    a prefix test on it cannot be escaped; scheme and host in lower case."""
    protocol, path = split_protocol(url)
    protocol = (protocol or "file").lower()
    if protocol in ("file", "local"):
        return os.path.realpath(path)
    if protocol in ("http", "https"):
        parts = urlsplit(url)
        return f"{protocol}://{parts.netloc.lower()}{_clean(parts.path)}"
    return f"{protocol}://{_clean(path).lstrip('/')}"


def _clean(path: str) -> str:
    # (POSIX normpath keeps a leading "//": strip it first)
    return posixpath.normpath("/" + path.lstrip("/"))


def _under(location: str, root: str) -> bool:
    return location == root or location.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class AllowedInputs:
    roots: tuple[str, ...]  # normalized prefixes

    @classmethod
    def of(cls, manifest_root: str, allow: tuple[str, ...] = ()) -> AllowedInputs:
        return cls(tuple(normalized(root) for root in (manifest_root, *allow)))

    def refusal(self, url: str) -> str | None:
        """Why URL may not be read (None: it may)."""
        location = normalized(url)
        if any(_under(location, root) for root in self.roots):
            return None
        return (f"{url} is outside the allowed inputs (the manifest's folder and shard.inputs.allow: "
                f"{', '.join(self.roots)})")
