"""Embedding cache: vectors keyed by (payload sha256, encoder identity), on any fsspec URL.

Layout: ROOT/<sha256(identity)[:24]>/part-<sha256 of the part's bytes>.parquet. Parts are
immutable and content-addressed, written under a temporary name then renamed, so
  - concurrent writers (actors, jobs) never touch each other's files and lose nothing;
  - a truncated or altered part no longer matches its name: it is reported, set aside as
    `.corrupt`, and its entries are recomputed — a wrong vector is never served.
Each part holds one batch of appends (a shard's new vectors for one encoder)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocess.storage import filesystem, join, write_atomic

log = logging.getLogger(__name__)

PART = re.compile(r"part-([0-9a-f]{64})\.parquet")


@dataclass
class CacheScan:
    parts: list[str] = field(default_factory=list)  # valid part paths
    hashes: set[str] = field(default_factory=set)
    dim: int | None = None
    corrupt: list[str] = field(default_factory=list)


class EmbeddingCache:
    def __init__(self, root: str, identity: str, storage_options: dict | None = None):
        self.identity = identity
        self.storage_options = storage_options or {}
        self.fs, base = filesystem(root, self.storage_options)
        self.folder = join(base, hashlib.sha256(identity.encode()).hexdigest()[:24])

    def _read_part(self, path: str) -> pa.Table | None:
        """The part's table, or None when its bytes do not match its name (or do not parse)."""
        try:
            data = self.fs.cat_file(path)
            match = PART.fullmatch(path.rsplit("/", 1)[-1])
            if match is None or hashlib.sha256(data).hexdigest() != match.group(1):
                return None
            table = pq.read_table(io.BytesIO(data))
            if table.schema.metadata.get(b"identity", b"").decode() != self.identity:
                return None
            return table
        except (OSError, pa.ArrowException, AttributeError):
            return None

    def _set_aside(self, path: str) -> None:
        log.warning("embedding cache part %s is corrupt: set aside, its entries will be recomputed", path)
        with contextlib.suppress(OSError):  # another job may have set it aside first
            self.fs.mv(path, path + ".corrupt")

    def scan(self) -> CacheScan:
        """Validate every part; what is cached, and what was found corrupt."""
        scan = CacheScan()
        if not self.fs.exists(self.folder):
            return scan
        for path in sorted(self.fs.glob(join(self.folder, "part-*.parquet"))):
            table = self._read_part(path)
            if table is None:
                scan.corrupt.append(path)
                self._set_aside(path)
                continue
            scan.parts.append(path)
            scan.hashes.update(table.column("sha256").to_pylist())
            scan.dim = int(table.schema.metadata[b"dim"])
        return scan

    def read(self, parts: list[str], wanted: set[str]) -> dict[str, np.ndarray]:
        """Vectors of the wanted hashes found in these parts (each part checked again)."""
        found: dict[str, np.ndarray] = {}
        for path in parts:
            table = self._read_part(path)
            if table is None:
                self._set_aside(path)
                continue
            hashes = table.column("sha256").to_pylist()
            vectors = table.column("vector")
            for i, h in enumerate(hashes):
                if h in wanted and h not in found:
                    found[h] = np.asarray(vectors[i].values, dtype=np.float32)
        return found

    def append(self, hashes: list[str], vectors: np.ndarray, dim: int) -> str | None:
        """Write one immutable part; returns its path."""
        if not hashes:
            return None
        rows = np.ascontiguousarray(vectors, dtype=np.float32)
        offsets = pa.array(np.arange(0, rows.size + 1, rows.shape[1], dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))
        table = pa.table({"sha256": pa.array(hashes, pa.string()), "vector": column})
        table = table.replace_schema_metadata({"identity": self.identity, "dim": str(dim)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        path = join(self.folder, f"part-{hashlib.sha256(data).hexdigest()}.parquet")
        self.fs.makedirs(self.folder, exist_ok=True)
        write_atomic(self.fs, path, data)
        return path
