"""Embedding cache: vectors keyed by the sha256 of the payload they embed, one Lance dataset
per encoder identity, on any store Lance reaches (local disk, S3): ROOT/<sha256(identity)[:24]>.lance

- Lookups by key use a BTREE scalar index on `sha256`: a shard's lookup costs what it fetches,
  not what the cache holds (`maintain` folds newly appended rows into the index).
- Writers append with merge_insert on `sha256`, declared the (unenforced) primary key, so
  concurrent inserts of the same hashes by several actors or jobs conflict and retry instead
  of duplicating; different hashes just commit one after the other. Nothing is lost.
- Integrity: each row carries `check` = crc32(sha256 || vector bytes). A row whose check fails
  (a flipped bit) is reported, deleted and recomputed; a data file Lance cannot decode (a
  truncated one: twice, a second apart, and no storage error) is reported and its fragment
  dropped, its rows recomputed. Neither is served. A storage error (timeout, throttling, 5xx:
  Lance's own client retried it) fails the call loudly and never drops anything.
- Vectors are stored as they came, float32 (a video clip's frame vectors, flattened).
- The earlier layout (immutable Parquet parts in ROOT/<digest>/) is migrated on first use."""

from __future__ import annotations

import hashlib
import io
import logging
import time
import zlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tessera.core.storage import Store, is_transient

log = logging.getLogger(__name__)

LOOKUP_BATCH = 1024  # hashes per IN filter
PROBE_AGAIN_S = 1.0  # before a fragment that failed to decode is tried once more
_READ_ERRORS = (OSError, ValueError)  # what Lance raises for a file it cannot read
COMMIT_ATTEMPTS = 5  # of an insert whose commit conflicts with a concurrent one
# what Lance's messages say of storage trouble (its object-store client retried it already);
# Lance's errors carry no status or errno, only text
_TRANSIENT_TEXT = ("timed out", "timeout", "connection", "503", "500 internal", "502", "504", "slow down",
                   "slowdown", "throttl", "reset by peer", "broken pipe", "temporarily unavailable",
                   "too many requests")


def looks_transient(error: BaseException) -> bool:
    return is_transient(error) or any(text in str(error).lower() for text in _TRANSIENT_TEXT)


def _decodes(fragment) -> bool:
    """Whether a fragment reads whole; a storage error raises (it says nothing of the data)."""
    try:
        fragment.to_table(columns=["sha256", "vector", "check"])
    except _READ_ERRORS as e:
        if looks_transient(e):
            raise
        return False
    return True


def row_check(sha256: str, vector: np.ndarray) -> int:
    return zlib.crc32(vector.astype(np.float32, copy=False).tobytes(), zlib.crc32(sha256.encode()))


class EmbeddingCache:
    """The vectors of one encoder identity under a cache root. Keeps its Lance dataset open, so
    an actor's repeated lookups and inserts reuse the loaded index."""

    def __init__(self, root: Store, identity: str):
        self.identity = identity
        self.root = root
        self.digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
        self.uri = self.root.url_of(self.digest + ".lance")
        self.corrupt: list[str] = []  # what this process found broken, for the stage summary
        self._dataset = None
        self._migrated = False

    def __reduce__(self):
        return EmbeddingCache, (self.root, self.identity)

    def _schema(self) -> pa.Schema:
        key = pa.field("sha256", pa.string(), nullable=False,
                       metadata={"lance-schema:unenforced-primary-key": "true"})
        return pa.schema([key, pa.field("vector", pa.list_(pa.float32())), pa.field("check", pa.uint32())],
                         metadata={"identity": self.identity})


    def _open(self, refresh: bool = False):
        """The dataset (None while nothing is cached); REFRESH moves it to the latest version."""
        import lance

        if self._dataset is not None and refresh:
            self._dataset = self._dataset.checkout_version(self._dataset.latest_version)
        elif self._dataset is None:
            try:
                self._dataset = lance.dataset(self.uri, **self.root.lance_kwargs())
            except (ValueError, OSError) as e:  # no committed version yet: nothing is cached
                if "not found" not in str(e).lower():
                    raise
                if not self._migrated:
                    self._migrated = True
                    self._migrate()
                return self._dataset
            held = (self._dataset.schema.metadata or {}).get(b"identity", b"").decode()
            if held != self.identity:
                raise ValueError(f"{self.uri} holds vectors of {held!r}, not of {self.identity!r}")
        return self._dataset

    def lookup(self, hashes: Iterable[str], refresh: bool = False) -> dict[str, np.ndarray]:
        """The cached vectors of these hashes (those not cached are absent); REFRESH first sees
        what other writers added since this process opened the cache."""
        wanted = sorted(set(hashes))
        dataset = self._open(refresh)
        found: dict[str, np.ndarray] = {}
        if dataset is None or not wanted:
            return found
        for start in range(0, len(wanted), LOOKUP_BATCH):
            found.update(self._fetch(wanted[start : start + LOOKUP_BATCH]))
        return found

    def _fetch(self, hashes: list[str]) -> dict[str, np.ndarray]:
        query = {"columns": ["sha256", "vector", "check"], "filter": pc.field("sha256").isin(hashes)}
        try:
            table = self._dataset.to_table(**query)
        except _READ_ERRORS as e:
            if looks_transient(e):  # Lance retried it already: fail loudly, never take it for corruption
                raise
            self._drop_unreadable(e)
            table = self._dataset.to_table(**query)
        vectors = table.column("vector").combine_chunks()
        offsets, values = vectors.offsets.to_numpy(), vectors.values.to_numpy(zero_copy_only=False)
        found, bad = {}, []
        for i, (h, check) in enumerate(zip(table.column("sha256").to_pylist(), table.column("check").to_pylist(),
                                           strict=True)):
            vector = values[offsets[i] : offsets[i + 1]]
            if row_check(h, vector) == check:
                found[h] = vector
            else:
                bad.append(h)
        if bad:
            self.corrupt.append(f"{self.uri}: {len(bad)} rows fail their check")
            log.warning("embedding cache %s: %d rows fail their check: deleted, they will be recomputed",
                        self.uri, len(bad))
            self._dataset.delete(pc.field("sha256").isin(bad))
        return found

    def _drop_unreadable(self, error: Exception) -> None:
        """Find the fragments Lance cannot decode and drop them (their rows are recomputed): a
        fragment is dropped only when it fails twice, a second apart, with an error that is no
        I/O trouble. A storage error while probing raises: it never costs a row."""
        import lance

        dataset = self._open(refresh=True)
        broken = []
        for fragment in dataset.get_fragments():
            if not _decodes(fragment):
                time.sleep(PROBE_AGAIN_S)
                if not _decodes(fragment):
                    broken.append(fragment.fragment_id)
        if not broken:
            raise error
        self.corrupt.append(f"{self.uri}: unreadable fragments {broken} ({error})")
        log.warning("embedding cache %s: fragments %s cannot be read (%s): dropped, their rows will be "
                    "recomputed", self.uri, broken, error)
        op = lance.LanceOperation.Delete(updated_fragments=[], deleted_fragment_ids=broken, predicate="true")
        self._dataset = lance.LanceDataset.commit(self.uri, op, read_version=dataset.version,
                                                  **self.root.lance_kwargs())

    def insert(self, hashes: list[str], vectors: list[np.ndarray]) -> None:
        """Add vectors; hashes already cached (by anyone, even concurrently) are left as they are."""
        if not hashes:
            return
        rows = [np.asarray(v, np.float32).reshape(-1) for v in vectors]
        offsets = np.cumsum([0] + [len(v) for v in rows]).astype(np.int32)
        table = pa.table({
            "sha256": pa.array(hashes, pa.string()),
            "vector": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(rows), pa.float32())),
            "check": pa.array([row_check(h, v) for h, v in zip(hashes, rows, strict=True)], pa.uint32()),
        }, schema=self._schema())
        if self._open() is None:
            self._create()
        self._merge(table)

    def _merge(self, table: pa.Table) -> None:
        """Insert the rows of TABLE whose hash is not cached yet."""
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                self._dataset.merge_insert("sha256").when_not_matched_insert_all().execute(table)
                return
            except OSError as e:  # another writer's commit Lance cannot rebase ours on: reread, again
                if "Incompatible transaction" not in str(e) or attempt == COMMIT_ATTEMPTS - 1:
                    raise
                self._open(refresh=True)

    def _create(self) -> None:
        """Create the dataset, empty: of writers creating it at once, Lance's own commit lets one
        win ("Dataset already exists" for the others, on disk and on object stores with
        conditional puts); a loser opens the winner's."""
        import lance

        try:
            self._dataset = lance.write_dataset(self._schema().empty_table(), self.uri, schema=self._schema(),
                                                mode="create", **self.root.lance_kwargs())
        except _READ_ERRORS as e:
            if "already exists" not in str(e):
                raise
            self._open()
            return
        if self._dataset.version > 1:
            # the create lost the race and Lance committed it as an overwrite of the winner's
            # dataset: put back what the version before held (nothing is lost, nothing doubled)
            before = self._dataset.checkout_version(self._dataset.version - 1).to_table()
            self._dataset = self._dataset.checkout_version(self._dataset.latest_version)
            if before.num_rows:
                self._merge(before)

    def keep_indexed(self, lag: int) -> None:
        """Fold appended rows into the index once more than LAG are outside it: merge_insert
        joins against un-indexed rows in full, so they must not pile up during a long run."""
        dataset = self._open()
        if dataset is None:
            return
        indexes = dataset.describe_indices()
        if dataset.count_rows() - (indexes[0].num_rows_indexed if indexes else 0) <= lag:
            return
        try:
            dataset.optimize.optimize_indices() if indexes else dataset.create_scalar_index("sha256", "BTREE")
        except _READ_ERRORS as e:  # another writer is indexing at the same time: theirs will do
            log.info("embedding cache %s: indexing left to another writer (%s)", self.uri, e)
        self._open(refresh=True)

    def maintain(self) -> None:
        """Merge small fragments and fold new rows into the index, so lookups stay indexed."""
        dataset = self._open(refresh=True)
        if dataset is None:
            return
        if len(dataset.get_fragments()) > 64:
            dataset.optimize.compact_files(target_rows_per_fragment=1 << 20)
        if dataset.describe_indices():
            dataset.optimize.optimize_indices()
        elif dataset.count_rows():
            dataset.create_scalar_index("sha256", "BTREE")
        self._dataset = self._open(refresh=True)

    def count(self) -> int:
        dataset = self._open(refresh=True)
        return 0 if dataset is None else dataset.count_rows()

    def _migrate(self) -> None:
        """Vectors of the earlier layout (Parquet parts named by their sha256) moved into the
        Lance dataset; a part whose bytes do not match its name is reported and not moved."""
        parts = self.root.names(f"{self.digest}/part-*.parquet")
        if not parts:
            return
        log.info("embedding cache %s: migrating %d Parquet parts to %s", self.root.url, len(parts), self.uri)
        for name in parts:
            data = self.root.read_bytes(name)
            if hashlib.sha256(data).hexdigest() != name.rsplit("part-", 1)[1].removesuffix(".parquet"):
                self.corrupt.append(f"{self.root.url_of(name)}: bytes do not match the part's name")
                continue
            table = pq.read_table(io.BytesIO(data))
            self.insert(table.column("sha256").to_pylist(),
                        [np.asarray(v, np.float32) for v in table.column("vector").to_pylist()])
        self.maintain()
        self.root.remove(self.digest, recursive=True)
