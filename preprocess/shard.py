"""Work of one Ray task: turn a planned chunk of manifest rows into a committed shard.

Plain functions over plain data; the driver (stage.py) decides where they run. A task reads
its rows from the manifest itself (the plan says where they are, not what they are) and
every input file once: the raw bytes are hashed for the dedup pass while they are processed."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from tessera.core.lease import Fence
from tessera.core.storage import Store
from tessera.preprocess.config import MODALITIES, ShardConfig
from tessera.preprocess.layout import INDEX_SCHEMA, REJECT_SCHEMA, ShardMarker, index_part, rejects_part, shard_stem
from tessera.preprocess.manifest import Chunk, LineReject, ManifestRow, chunk_rows, fetch_batch
from tessera.preprocess.near import text_minhashes
from tessera.preprocess.reject import Reject
from tessera.preprocess.sample import SampleOutput, sample_or_reject
from tessera.preprocess.stats import DatasetStats

log = logging.getLogger(__name__)

FETCH_BATCH = 16  # samples whose files are read together (concurrently on object stores)
TAR_OWNER = "tessera"
TAR_MTIME = 0  # fixed so the same inputs give byte-identical tars


@dataclass(frozen=True)
class ShardPlan:
    index: int
    chunk: Chunk
    config_digest: str

    @property
    def name(self) -> str:
        return shard_stem(self.index)

    @property
    def plan_digest(self) -> str:
        """Changes when the config, the manifest file or the rows planned into this shard change."""
        f, c = self.chunk.file, self.chunk
        text = f"{self.config_digest}\0{f.name}\0{f.size}\0{f.tag}\0{c.start}\0{c.stop}\0{c.first_line}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_id(sha256: dict[str, str]) -> str:
    """Identity of a sample's content over all its modalities (what exact dedup compares),
    from the sha256 of each raw input."""
    return hashlib.sha256(repr(sorted(sha256.items())).encode()).hexdigest()


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def index_row(plan: ShardPlan, row: ManifestRow, raw_sha256: dict[str, str], raw_bytes: int,
              out: SampleOutput) -> dict:
    """OUT's index row; RAW_SHA256 and RAW_BYTES: its row's inputs (hashed once for all its samples)."""
    return {
        "key": out.record["__key__"],
        "source_key": row.source_key,
        "shard": plan.name + ".tar",
        "file": row.file,
        "line": row.line,
        "label": None if row.label is None else str(row.label),
        "targets": json.dumps(row.targets, sort_keys=True) if row.targets else None,
        "modalities": list(out.modalities),
        **{f"{m}_sha256": raw_sha256.get(m) for m in MODALITIES},
        # what the embedding cache is keyed by: the stored (normalized) member's bytes
        **{f"{m}_payload_sha256": _sha256(out.payload(m)) for m in MODALITIES},
        # a part of its row (a volume's slice) is told from the row's other parts by its own digest
        "content_id": content_id(raw_sha256 if out.part_sha256 is None else {**raw_sha256, "part": out.part_sha256}),
        "raw_bytes": raw_bytes,
        "stored_bytes": out.stored_bytes,
        "duplicate_of": None,
        "image_phash": out.image_phash,
        "text_minhash": None,  # signed in bulk once the shard's texts are known
        "curated_out": None,
        "split_group": out.group,
    }


def compares_text(out: SampleOutput, cfg: ShardConfig) -> bool:
    """Whether the sample's text takes part in near dedup: by default only a text-only sample's
    (captions of media are often boilerplate that would drop distinct pictures)."""
    near = cfg.near_dedup.text
    return near.threshold is not None and "text" in out.modalities and (near.with_media or out.modalities == ("text",))


def _parsed_rows(plan: ShardPlan, cfg: ShardConfig, rejects: list[LineReject]):
    """The chunk's rows; a key seen earlier in this shard is rejected here (a tar cannot hold
    two samples of one key); keys repeated across shards are left to the dedup pass."""
    first_line: dict[str, int] = {}
    for row in chunk_rows(plan.chunk, cfg):
        if isinstance(row, LineReject):
            rejects.append(row)
        elif row.key in first_line:
            repeated = Reject("dedup.duplicate_key", f"duplicate key (first on line {first_line[row.key]})")
            rejects.append(row.rejected(repeated))
        else:
            first_line[row.key] = row.line
            yield row


@dataclass
class _Written:
    """What a shard task has made so far: index rows, reject lines, statistics, the rows that
    made samples (a row may make several), and (index position, text) of the texts near dedup signs."""

    index: list[dict] = field(default_factory=list)
    rejects: list[LineReject] = field(default_factory=list)
    stats: DatasetStats = field(default_factory=DatasetStats)
    rows: int = 0
    texts: list[tuple[int, str]] = field(default_factory=list)


def write_shard(plan: ShardPlan, cfg: ShardConfig, out: Store, fence: Fence) -> ShardMarker:
    """Process a planned shard and commit it: the tar (written whole, then committed), then its
    index and rejects parts, then — while FENCE's lease still holds — the JSON marker (counts,
    statistics). The inputs are read through the manifest file's store."""
    import webdataset as wds  # here: it imports torch, which `tessera predict --bundle` does without

    tar_name = plan.name + ".tar"
    inputs = plan.chunk.file.store
    done, rows = _Written(), []
    with out.writing(tar_name) as f, wds.TarWriter(
        f, user=TAR_OWNER, group=TAR_OWNER, mode=0o444, mtime=TAR_MTIME, encoder=False
    ) as tar:
        for row in _parsed_rows(plan, cfg, done.rejects):
            rows.append(row)
            if len(rows) == FETCH_BATCH:
                _write_batch(rows, cfg, inputs, tar, plan, done)
                rows = []
        _write_batch(rows, cfg, inputs, tar, plan, done)
    index, rejects = done.index, done.rejects
    for (position, _), signature in zip(done.texts, text_minhashes([t for _, t in done.texts], cfg.near_dedup.text),
                                        strict=True):
        index[position]["text_minhash"] = signature
    rejects.sort(key=lambda r: r.line)
    out.write_parquet(index_part(plan.name), pa.Table.from_pylist(index, schema=INDEX_SCHEMA))
    out.write_parquet(rejects_part(plan.name),
                      pa.Table.from_pylist([r.as_record() for r in rejects], schema=REJECT_SCHEMA))
    marker = ShardMarker(tar_name, plan.plan_digest, rows=done.rows + len(rejects), written=len(index),
                         rejected=len(rejects), rejected_by_code=dict(Counter(r.code for r in rejects)),
                         bytes=out.size(tar_name), stats=done.stats.to_dict())
    fence.check(f"the marker of {plan.name}")
    out.write_json(plan.name + ".json", marker.to_json())
    log.info("%s committed: %d written, %d rejected, %d bytes", tar_name, len(index), len(rejects), marker.bytes)
    return marker


def _write_batch(rows: list[ManifestRow], cfg: ShardConfig, inputs: Store, tar, plan: ShardPlan,
                 done: _Written) -> None:
    """Process ROWS and write their samples into TAR, recording them in DONE."""
    for row, raw in fetch_batch(rows, inputs, cfg.max_input_bytes):
        result = raw if isinstance(raw, LineReject) else sample_or_reject(row, raw, cfg)
        if isinstance(result, LineReject):
            done.rejects.append(result)
            continue
        done.rows += 1
        if row.text is not None:
            raw = {**raw, "text": row.text.encode()}
        raw_sha256 = {m: hashlib.sha256(b).hexdigest() for m, b in raw.items()}
        raw_bytes = sum(len(b) for b in raw.values())
        for sample in result:
            tar.write(sample.record)
            if compares_text(sample, cfg):
                done.texts.append((len(done.index), sample.record["txt"].decode()))
            done.index.append(index_row(plan, row, raw_sha256, raw_bytes, sample))
            done.stats.add(sample)
