"""Sidecars (features/layout.py: one Parquet per shard, joinable to the tar by key, one column
per modality): plain functions over a shard's index rows and the vectors found for them; the
stage and its actors decide where they run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from tessera.core.storage import Store
from tessera.core.versions import SHARD_KEPT
from tessera.features.config import EmbedConfig
from tessera.features.layout import DIGEST, DIMS, ENCODERS, INCOMPLETE, MISSING, sidecar_digest, sidecar_name
from tessera.features.prepare import pooled_frames
from tessera.preprocess.layout import read_index_part


@dataclass
class ShardRows:
    """The kept samples of one shard (index order) and their payload hashes per modality."""

    keys: list[str]
    payloads: dict[str, list[str | None]]

    @classmethod
    def read(cls, shards: Store, shard: str, modalities: list[str]) -> ShardRows:
        table = read_index_part(shards, shard, ["key", *(f"{m}_payload_sha256" for m in modalities)], kept=SHARD_KEPT)
        return cls(table.column("key").to_pylist(),
                   {m: table.column(f"{m}_payload_sha256").to_pylist() for m in modalities})

    def hashes(self, modality: str) -> set[str]:
        """The distinct payloads of a modality in this shard."""
        return {h for h in self.payloads[modality] if h}

    def hashes_of_samples(self, modality: str) -> list[str]:
        """The payload of each sample that has the modality."""
        return [h for h in self.payloads[modality] if h]

    def digest(self, identities: dict[str, str], cfg: EmbedConfig) -> str:
        """What the sidecar depends on: keys, payloads, encoders, output settings."""
        keep = bool(cfg.video and cfg.video.keep_frames)
        text = json.dumps([self.keys, self.payloads, identities, cfg.dtype, keep], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def owned_by(shards: Store, plan: str, shard: str) -> dict[str, dict[str, str]]:
    """The payloads the embed plan gives SHARD to compute: modality -> hash -> the key of its
    first sample there. The plan is sorted by shard, so only a few row groups are read."""
    table = shards.read_parquet(plan, ["modality", "sha256", "key"], ds.field("shard") == shard)
    owned: dict[str, dict[str, str]] = {}
    for modality, h, key in zip(*(table.column(c).to_pylist() for c in ("modality", "sha256", "key")), strict=True):
        owned.setdefault(modality, {})[h] = key
    return owned


def sidecar_is_current(shards: Store, shard: str, digest: str) -> bool:
    return sidecar_digest(shards, shard) == digest


def _vector_column(vectors: list[np.ndarray | None], dim: int, dtype: str) -> pa.Array:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    flat = np.zeros((len(vectors), dim), dtype=dtype)
    present = np.array([v is not None for v in vectors], bool)
    for i, v in enumerate(vectors):
        if v is not None:
            flat[i] = v
    values = pa.array(flat.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~present))


def write_sidecar(shards: Store, shard: str, rows: ShardRows, vectors: dict[str, dict[str, np.ndarray]],
                  dims: dict[str, int], identities: dict[str, str], digest: str, cfg: EmbedConfig) -> dict:
    """Write the shard's sidecar from vectors[modality][hash]; returns, per modality, the samples
    whose vector is missing (left null). A sidecar with missing vectors says which (MISSING) and
    is not current (its digest is marked incomplete): the next run computes them."""
    columns = {"key": pa.array(rows.keys, pa.string())}
    missing, lacking = {}, {}
    for modality, dim in dims.items():
        per_sample = [vectors[modality].get(h) if h else None for h in rows.payloads[modality]]
        lacking[modality] = [key for key, h, v in zip(rows.keys, rows.payloads[modality], per_sample, strict=True)
                             if h and v is None]
        missing[modality] = len(lacking[modality])
        if modality == "video":
            frames = [None if v is None else v.reshape(-1, dim) for v in per_sample]
            columns["video"] = _vector_column([None if f is None else pooled_frames(f, dim)
                                               for f in frames], dim, cfg.dtype)
            if cfg.video.keep_frames:
                columns["video_frames"] = pa.array(
                    [None if f is None else f.astype(cfg.dtype).tolist() for f in frames],
                    pa.list_(pa.list_(pa.float16() if cfg.dtype == "float16" else pa.float32(), dim)))
        else:
            columns[modality] = _vector_column(per_sample, dim, cfg.dtype)
    metadata = {DIGEST: digest if not any(missing.values()) else INCOMPLETE + digest,
                ENCODERS: json.dumps({m: identities[m] for m in dims}), DIMS: json.dumps(dims)}
    if any(missing.values()):
        metadata[MISSING] = json.dumps({m: keys for m, keys in lacking.items() if keys})
    shards.write_parquet(sidecar_name(shard), pa.table(columns).replace_schema_metadata(metadata))
    return missing
