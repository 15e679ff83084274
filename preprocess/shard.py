"""Work of one Ray task: hash a chunk of inputs, or turn a planned shard into a committed tar.

Both are plain functions over plain data; the driver (stage.py) decides where they run."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import webdataset as wds

from preprocess.config import MODALITIES, ShardConfig
from preprocess.manifest import LineReject, ManifestRow
from preprocess.reject import Reject
from preprocess.sample import SampleOutput, process_sample
from preprocess.stats import DatasetStats
from preprocess.storage import filesystem, join, read_many, write_json

log = logging.getLogger(__name__)

FETCH_BATCH = 16  # samples whose files are read together (concurrently on object stores)
TAR_OWNER = "tessera"
TAR_MTIME = 0  # fixed so the same inputs give byte-identical tars


@dataclass(frozen=True)
class InputDigest:
    sha256: dict[str, str]  # modality -> sha256 of the raw input (file bytes or inline text)
    sizes: dict[str, int]

    @property
    def content_id(self) -> str:
        """Identity of a sample's content over all its modalities (for exact dedup)."""
        return hashlib.sha256(repr(sorted(self.sha256.items())).encode()).hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    index: int
    rows: tuple[ManifestRow, ...]
    digests: tuple[InputDigest, ...]
    config_digest: str

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}"

    @property
    def plan_digest(self) -> str:
        """Changes when the config, or any key or content planned into this shard, changes."""
        h = hashlib.sha256(self.config_digest.encode())
        for row, digest in zip(self.rows, self.digests, strict=True):
            h.update(f"\0{row.key}\0{row.label}\0{digest.content_id}".encode())
        return h.hexdigest()[:16]


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _reject(row: ManifestRow, modality: str | None, reason: str) -> LineReject:
    return LineReject(row.line, row.source_key, modality, reason)


def _read_error(url: str, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return f"file not found: {url}"
    return f"cannot read {url}: {type(err).__name__}: {err}"


def fetch_batch(
    rows: list[ManifestRow], storage_options: dict
) -> list[tuple[ManifestRow, dict[str, bytes] | LineReject]]:
    """Raw bytes of every file of each row (by modality), or the row's read reject."""
    got = read_many([url for row in rows for url in row.files.values()], storage_options)
    out = []
    for row in rows:
        raw: dict[str, bytes] = {}
        failure = None
        for modality, url in row.files.items():
            data = got[url]
            if isinstance(data, Exception):
                failure = _reject(row, modality, _read_error(url, data))
                break
            if not data:
                failure = _reject(row, modality, "empty file")
                break
            raw[modality] = data
        out.append((row, failure or raw))
    return out


def digest_inputs(rows: list[ManifestRow], storage_options: dict) -> list[InputDigest | LineReject]:
    """Hash the raw inputs of each row, so dedup and shard planning happen before decoding."""
    results: list[InputDigest | LineReject] = []
    for start in range(0, len(rows), FETCH_BATCH):
        for row, raw in fetch_batch(rows[start : start + FETCH_BATCH], storage_options):
            if isinstance(raw, LineReject):
                results.append(raw)
                continue
            if row.text is not None:
                raw = {**raw, "text": row.text.encode()}
            results.append(InputDigest(
                {m: hashlib.sha256(b).hexdigest() for m, b in sorted(raw.items())},
                {m: len(b) for m, b in sorted(raw.items())},
            ))
    return results


def sample_or_reject(row: ManifestRow, raw: dict[str, bytes], cfg: ShardConfig) -> SampleOutput | LineReject:
    """The one place a sample's failure becomes a reject line."""
    try:
        return process_sample(row, raw, cfg)
    except Reject as r:
        return _reject(row, r.modality, r.reason)
    except Exception as e:  # a decoder bug must not take the shard down with it
        log.exception("unexpected error on %s (line %d)", row.source_key, row.line)
        return _reject(row, None, f"unexpected error: {type(e).__name__}: {e}")


def index_row(plan: ShardPlan, row: ManifestRow, digest: InputDigest, out: SampleOutput) -> dict:
    return {
        "key": row.key,
        "source_key": row.source_key,
        "shard": plan.name + ".tar",
        "line": row.line,
        "label": None if row.label is None else str(row.label),
        "modalities": list(out.modalities),
        **{f"{m}_sha256": digest.sha256.get(m) for m in MODALITIES},
        # what the embedding cache is keyed by: the stored (normalized) member's bytes
        **{f"{m}_payload_sha256": _sha256(out.payload(m)) for m in MODALITIES},
        "raw_bytes": sum(digest.sizes.values()),
        "stored_bytes": out.stored_bytes,
    }


def write_shard(plan: ShardPlan, cfg: ShardConfig, out_dir: str, storage_options: dict) -> dict:
    """Process a planned shard and commit it: tar under a temporary name, rename, then the
    JSON marker (index rows, rejects, statistics) written last. Returns the marker."""
    fs, root = filesystem(out_dir, storage_options)
    tar_path = join(root, plan.name + ".tar")
    tmp_path = f"{tar_path}.tmp-{plan.plan_digest}"
    stats = DatasetStats()
    index, rejects = [], []
    digests = {row.key: digest for row, digest in zip(plan.rows, plan.digests, strict=True)}
    with fs.open(tmp_path, "wb") as f, wds.TarWriter(
        f, user=TAR_OWNER, group=TAR_OWNER, mode=0o444, mtime=TAR_MTIME, encoder=False
    ) as tar:
        for start in range(0, len(plan.rows), FETCH_BATCH):
            for row, raw in fetch_batch(list(plan.rows[start : start + FETCH_BATCH]), storage_options):
                result = raw if isinstance(raw, LineReject) else sample_or_reject(row, raw, cfg)
                if isinstance(result, LineReject):
                    rejects.append(result.as_record())
                    continue
                tar.write(result.record)
                index.append(index_row(plan, row, digests[row.key], result))
                if result.pixel_histogram is not None:
                    stats.add_image(result.pixel_histogram)
                if result.audio_rms_db is not None:
                    stats.add_audio(result.audio_rms_db)
                if result.text_chars is not None:
                    stats.add_text(result.text_chars)
    fs.mv(tmp_path, tar_path)
    marker = {
        "shard": plan.name + ".tar",
        "plan_digest": plan.plan_digest,
        "samples": len(index),
        "bytes": fs.size(tar_path),
        "index": index,
        "rejects": rejects,
        "stats": stats.to_dict(),
    }
    write_json(fs, join(root, plan.name + ".json"), marker)
    return marker
