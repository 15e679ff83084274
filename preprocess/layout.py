"""What the shard stage leaves in OUT, each name said once, and how readers find what is committed.

    OUT/shard-config.json          the config OUT is written with
    OUT/manifest-source.json       the manifest files (sizes, ETags / mtimes) OUT is written from
    OUT/shard-NNNNNN.tar           WebDataset samples
    OUT/shard-NNNNNN.json          the shard's commit marker (counts, statistics), written last
    OUT/index/shard-NNNNNN.parquet one row per sample of the tar; `duplicate_of` set by the dedup pass
    OUT/rejects/shard-NNNNNN.parquet   one row per manifest row of the shard that was rejected
    OUT/rejects/duplicates.parquet     rows the dedup pass dropped, with the row they duplicate
    OUT/summary.json               written last: the stage is complete

Readers take the index as a Parquet dataset, column-projected and filtered to the kept rows
(`duplicate_of` null); no process loads it whole. Light imports only: the CLI uses this
module to find an up-to-date OUT before it starts Ray."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from tessera.core.errors import DamagedOutput, OutputConflict
from tessera.core.storage import Store
from tessera.core.summary import StageSummary
from tessera.core.versions import INDEX, KEPT
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.manifest import ManifestSource
from tessera.preprocess.modality import MODALITIES, registry

SHARD_CONFIG = "shard-config.json"
MANIFEST_SOURCE = "manifest-source.json"
SUMMARY = "summary.json"
REJECTS = "rejects"
DUPLICATES = f"{REJECTS}/duplicates.parquet"
MARKER = re.compile(r"shard-(\d{6,})\.json")

def member_payload(sample: dict, modality: str) -> bytes | None:
    """A WebDataset sample's payload of MODALITY (its first member extension present), or None."""
    return registry()[modality].payload(sample)


def iter_shard(shards: Store, shard: str, select: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The samples of a WebDataset tar, streamed through webdataset's own tar iterators;
    select(member_name) -> bool skips the bytes of members that are not needed."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    url = shards.url_of(shard)
    with shards.open(shard) as stream:
        files = tar_file_iterator(stream, select_files=select)
        yield from group_by_keys({**f, "__url__": url} for f in files)


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_key", pa.string()), ("shard", pa.string()), ("file", pa.string()),
    ("line", pa.int64()), ("label", pa.string()),
    ("targets", pa.string()),  # JSON of shard.targets' values present in the row (null: none)
    ("modalities", pa.list_(pa.string())),
    *[(f"{m}_sha256", pa.string()) for m in MODALITIES],
    *[(f"{m}_payload_sha256", pa.string()) for m in MODALITIES],
    ("content_id", pa.string()), ("raw_bytes", pa.int64()), ("stored_bytes", pa.int64()),
    ("duplicate_of", pa.string()),
    # near-dedup fingerprints (null unless shard.near_dedup compares the row): the image's
    # 64-bit pHash, the text's MinHash signature
    ("image_phash", pa.int64()), ("text_minhash", pa.list_(pa.uint32())),
    # set by `tessera curate` (semantic duplicates, dropped outliers): the reason; null: kept
    ("curated_out", pa.string()),
    # what the train/validation split and the folds hash (null: the key): shard.group_field's
    # value, or a DICOM's keyed patient hash
    ("split_group", pa.string()),
])
# key: as the manifest gave it (null when the line is not JSON); sample_key: the safe key the
# row claimed once it parsed (what duplicate keys are found by)
REJECT_SCHEMA = pa.schema([
    ("key", pa.string()), ("sample_key", pa.string()), ("file", pa.string()), ("line", pa.int64()),
    ("modality", pa.string()),
    ("code", pa.string()),  # preprocess/reject.py: CODES (what counts and filters group by)
    ("reason", pa.string()),  # what a person reads
])
# what the passes over the whole output drop (rejects/duplicates.parquet, rejects/curated.parquet):
# reject lines with the shard that holds the row and the key it duplicates (null: an outlier)
DROP_SCHEMA = pa.schema([*REJECT_SCHEMA, ("shard", pa.string()), ("duplicate_of", pa.string())])
# what the shard stage kept (what embedding and curation read), and what every other reader
# takes: those rows less the ones curation dropped
SCAN_BATCH = 16384  # index rows per batch when the index is streamed
READ_AHEAD = 4  # index parts read ahead while streaming


def shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


def index_part(shard: str) -> str:
    """The index part of a shard ('shard-000003.tar' or its stem)."""
    return f"{INDEX}/{shard.removesuffix('.tar')}.parquet"


def rejects_part(shard: str) -> str:
    return f"{REJECTS}/{shard.removesuffix('.tar')}.parquet"


def committed_shards(store: Store) -> list[str]:
    """Names of the tars whose commit marker is written: the only ones readers may use.
    One listing of the folder, whatever the store."""
    names = {name.rsplit("/", 1)[-1] for name in store.names("shard-*")}
    return [name.removesuffix(".json") + ".tar" for name in sorted(names)
            if MARKER.fullmatch(name) and name.removesuffix(".json") + ".tar" in names]


def _batches(store: Store, pattern: str, schema: pa.Schema, columns: list[str] | None,
             where: ds.Expression | None) -> Iterator[pa.RecordBatch]:
    """The Parquet files matching PATTERN, filtered and projected, a few files read ahead in
    threads, in order. One file at a time, not one dataset over all: a dataset keeps every
    part's footer, memory that would grow with the shard count."""

    def read(name: str) -> pa.Table:
        return store.read_parquet(name, columns or schema.names, where, schema)

    names = iter(store.names(pattern))
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        window = deque(pool.submit(read, name) for name in islice(names, READ_AHEAD))
        while window:
            table = window.popleft().result()
            window.extend(pool.submit(read, name) for name in islice(names, 1))
            yield from table.to_batches(max_chunksize=SCAN_BATCH)


def index_batches(store: Store, columns: list[str], where: ds.Expression | None = None) -> Iterator[pa.RecordBatch]:
    """The kept rows of OUT's index (duplicates excluded), column-projected, in batches."""
    yield from _batches(store, f"{INDEX}/*.parquet", INDEX_SCHEMA, columns, KEPT if where is None else KEPT & where)


def read_index(store: Store, columns: list[str], where: ds.Expression | None = None) -> pa.Table:
    """The kept rows of OUT's index as one table of only COLUMNS (for per-shard or small reads)."""
    schema = pa.schema([INDEX_SCHEMA.field(c) for c in columns])
    return pa.Table.from_batches(list(index_batches(store, columns, where)), schema=schema)


def read_index_part(store: Store, shard: str, columns: list[str], where: ds.Expression | None = None,
                    kept: ds.Expression = KEPT) -> pa.Table:
    """The kept rows of one shard's index part (KEPT, or SHARD_KEPT: before curation), only COLUMNS."""
    return store.read_parquet(index_part(shard), columns, kept if where is None else kept & where, INDEX_SCHEMA)


def reject_batches(store: Store) -> Iterator[pa.RecordBatch]:
    """Every reject of OUT: the shard tasks', the dedup pass's, curation's (and the refresh's)."""
    yield from _batches(store, f"{REJECTS}/*.parquet", REJECT_SCHEMA, None, None)


# --- damage: what the stages committed, by size ---------------------------------------------

SIZES = "sizes.parquet"  # name and bytes of every file the stages committed here (written at their ends)
SIZES_SCHEMA = pa.schema([("name", pa.string()), ("bytes", pa.int64())])
# the shard stage's committed files (tars, markers, index and rejects parts)
SHARD_FILES = ("shard-[0-9]*.tar", "shard-[0-9]*.json", f"{INDEX}/*.parquet", f"{REJECTS}/*.parquet")
_SHARD_NUMBER = re.compile(r"(?:^|/)shard-(\d{6,})\.")


@dataclass(frozen=True)
class Damage:
    """A committed file that is gone, or whose size is not the one recorded when it was committed."""

    name: str
    recorded: int
    found: int | None  # None: not there

    def __str__(self) -> str:
        state = "missing" if self.found is None else f"{self.found} bytes, committed as {self.recorded}"
        return f"{self.name} ({state})"

    @property
    def shard(self) -> int | None:
        """The number of the shard the file belongs to (None: a file of the whole folder)."""
        found = _SHARD_NUMBER.search(self.name)
        return int(found.group(1)) if found else None


def read_sizes(store: Store) -> dict[str, int]:
    if not store.exists(SIZES):
        return {}
    table = store.read_parquet(SIZES, schema=SIZES_SCHEMA)
    return dict(zip(table.column("name").to_pylist(), table.column("bytes").to_pylist(), strict=True))


def record_sizes(store: Store, patterns: tuple[str, ...], fence) -> None:
    """Record the sizes a listing gives of the files matching PATTERNS (what a stage just
    committed), in place of what the record said of those patterns; committed while FENCE holds."""
    listed = {name: int(info["size"]) for pattern in patterns for name, info in store.infos(pattern).items()
              if ".tmp-" not in name}
    kept = {name: size for name, size in read_sizes(store).items()
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}
    names = sorted({**kept, **listed})
    merged = {**kept, **listed}
    fence.check(SIZES)
    store.write_parquet(SIZES, pa.table({"name": names, "bytes": [merged[n] for n in names]}, schema=SIZES_SCHEMA))


def damaged(store: Store, patterns: tuple[str, ...] | None = None) -> list[Damage]:
    """The recorded files (those matching PATTERNS; default all) that a listing shows gone or of
    another size: one listing per folder they are in, no file read but the record."""
    recorded = {name: size for name, size in read_sizes(store).items()
                if patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    folders = sorted({name.rsplit("/", 1)[0] if "/" in name else "" for name in recorded})
    listed: dict[str, int] = {}
    for folder in folders:
        listed.update({name: int(info["size"]) for name, info in store.infos(f"{folder}/*" if folder else "*").items()})
    return [Damage(name, size, listed.get(name)) for name, size in recorded.items() if listed.get(name) != size]


def check_damage(store: Store, patterns: tuple[str, ...] | None, redo: str) -> None:
    """Raise DamagedOutput when committed files of STORE (matching PATTERNS) are damaged; REDO
    says which command redoes them."""
    found = damaged(store, patterns)
    if found:
        shown = ", ".join(map(str, found[:5])) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise DamagedOutput(f"{store.url}: {len(found)} committed files are damaged: {shown}; {redo} redoes them")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_output(out: Store, cfg: ShardConfig, source: ManifestSource) -> None:
    """Refuse (OutputConflict) when OUT holds shards written with another config or from
    another manifest. Reads only: a command runs it before it starts Ray."""
    if out.exists(SHARD_CONFIG):
        previous = out.read_json(SHARD_CONFIG)
        if previous["config_digest"] != cfg.digest():
            old, new = _flatten(previous["config"]), _flatten(cfg.model_dump(mode="json"))
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise OutputConflict(f"{out.url} was written with another shard config (fields changed: "
                                 f"{', '.join(changed)}); write to a new output, or delete it first")
    recorded = out.read_json(MANIFEST_SOURCE) if out.exists(MANIFEST_SOURCE) else None
    if recorded is not None and recorded["fingerprint"] != source.fingerprint and committed_shards(out):
        old = {f["name"]: (f["size"], f["tag"]) for f in recorded["files"]}
        new = {f.name: (f.size, f.tag) for f in source.files}
        changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
        raise OutputConflict(f"{out.url} holds shards of other inputs than this manifest (files added, removed or "
                             f"changed: {', '.join(changed)}); write to a new output, or delete it first")


def claim_output(out: Store, cfg: ShardConfig, source: ManifestSource) -> None:
    """Record the config and the manifest in OUT, or refuse (check_output)."""
    check_output(out, cfg, source)
    if not out.exists(SHARD_CONFIG):
        out.makedirs()
        out.write_json(SHARD_CONFIG, {"config_digest": cfg.digest(), "config": cfg.model_dump(mode="json")})
    recorded = out.read_json(MANIFEST_SOURCE) if out.exists(MANIFEST_SOURCE) else None
    if recorded is None or recorded["fingerprint"] != source.fingerprint:
        out.write_json(MANIFEST_SOURCE, source.describe())


@dataclass(frozen=True)
class ShardMarker:
    """shard-NNNNNN.json, written last by the task that commits the shard: what it holds."""

    shard: str  # the tar's name
    plan_digest: str  # of the config and the manifest rows it was planned from
    rows: int  # manifest rows of the shard's chunk
    written: int  # samples in the tar
    rejected: int
    rejected_by_code: dict[str, int]
    bytes: int  # of the tar
    stats: dict  # preprocess/stats.py: DatasetStats.to_dict

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ShardMarker:
        return cls(**{f.name: record.get(f.name, {}) if f.name == "rejected_by_code" else record[f.name]
                      for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class ShardSummary(StageSummary):
    """summary.json, written last: the shard stage is complete. `resumed_shards` were committed
    by an earlier run; `up_to_date`: this run found every shard committed and wrote none."""

    FILE = SUMMARY

    inputs: int
    accepted: int
    rejected: int
    rejected_by_code: dict[str, int]
    duplicates: int
    shards: int
    bytes: int
    statistics: dict
    config_digest: str
    manifest: dict  # url, fingerprint, files
    resumed_shards: int = 0
    shards_by_node: dict[str, int] = field(default_factory=dict)
    samples_per_s: float = 0.0


def current_summary(out: Store, cfg: ShardConfig, source: ManifestSource) -> ShardSummary | None:
    """OUT's summary when OUT is complete for this config and manifest (no input is opened:
    the manifest files' sizes and ETags / mtimes stand for their content) and none of its
    committed files is damaged (their sizes, from listings), else None."""
    if not ShardSummary.exists(out):
        return None
    summary = ShardSummary.read(out)
    if (summary.config_digest, summary.manifest.get("fingerprint")) != (cfg.digest(), source.fingerprint) \
            or len(committed_shards(out)) != summary.shards or damaged(out, SHARD_FILES):
        return None
    return summary.replace(resumed_shards=summary.shards, shards_by_node={}, store_retries=0, up_to_date=True)


def mark_index_parts(store: Store, shards: list[str], listing: str, value: str, column: str, fence) -> int:
    """Set COLUMN in the index parts of SHARDS to the VALUE that the LISTING file (a drop list
    with `shard` and `sample_key`) gives each key, null for the others (so marks a later pass
    no longer makes are cleared); each part committed while FENCE's lease holds. Returns the
    keys marked."""
    import pyarrow.parquet as pq

    found = store.read_parquet(listing, ["shard", "sample_key", value], ds.field("shard").isin(shards))
    marks: dict[str, dict[str, str]] = {}
    for shard, key, mark in zip(*(found.column(c).to_pylist() for c in ("shard", "sample_key", value)), strict=True):
        marks.setdefault(shard, {})[key] = mark
    for shard in shards:
        part = pq.read_table(pa.BufferReader(store.read_bytes(index_part(shard))), schema=INDEX_SCHEMA)
        mine = marks.get(shard, {})
        values = pa.array([mine.get(k) for k in part.column("key").to_pylist()], pa.string())
        fence.check(index_part(shard))
        store.write_parquet(index_part(shard), part.set_column(part.schema.get_field_index(column), column, values))
    return sum(len(m) for m in marks.values())
