"""Sample keys that are safe as tar member names and as WebDataset keys."""

from __future__ import annotations

import hashlib
import re

MAX_KEY_CHARS = 64  # ustar names hold 100 bytes: key + "." + extension must fit
DIGEST_CHARS = 10
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# what a rewritten key ends with: a safe key of that shape is rewritten too, or "a.b" (rewritten
# to a_b_<digest>) and a key spelled a_b_<digest> would be one
_REWRITTEN = re.compile(rf"(?:^|_)[0-9a-f]{{{DIGEST_CHARS}}}$")


def safe_key(key: str) -> str:
    """Key unchanged when already safe; otherwise unsafe runs -> '_' plus a short hash of the
    original. Two different keys map to the same safe key only if they have the same stem and
    the same 40-bit digest prefix.

    No '/', '..' or '.' survive: WebDataset splits a member name at its first dot."""
    if _UNSAFE.search(key) is None and 0 < len(key) <= MAX_KEY_CHARS and not _REWRITTEN.search(key):
        return key
    digest = hashlib.sha256(key.encode(errors="surrogatepass")).hexdigest()[:DIGEST_CHARS]
    stem = _UNSAFE.sub("_", key).strip("_")[: MAX_KEY_CHARS - len(digest) - 1]
    return f"{stem}_{digest}" if stem else digest
