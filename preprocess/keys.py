"""Sample keys that are safe as tar member names and as WebDataset keys."""

from __future__ import annotations

import hashlib
import re

MAX_KEY_CHARS = 64  # ustar names hold 100 bytes: key + "." + extension must fit
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(key: str) -> str:
    """Key unchanged when already safe; otherwise unsafe runs -> '_' plus a short hash
    of the original, so two different keys never map to the same safe key.

    No '/', '..' or '.' survive: WebDataset splits a member name at its first dot."""
    if _UNSAFE.search(key) is None and 0 < len(key) <= MAX_KEY_CHARS:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    stem = _UNSAFE.sub("_", key).strip("_")[: MAX_KEY_CHARS - len(digest) - 1]
    return f"{stem}_{digest}" if stem else digest
