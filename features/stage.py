"""Driver of the embedding stage.

1. Plan from the index (payload hashes) and the cache: each distinct payload not yet
   cached is given to exactly one sample, so identical content costs one model call.
2. Encoder actors embed the planned members shard by shard and append to the cache.
3. Ray tasks write one sidecar per shard, `shard-NNNNNN.emb.parquet`, from the cache;
   a sidecar already up to date for its keys, payloads and encoders is left alone."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util import ActorPool
from tqdm import tqdm

from features.actor import EmbedWorker
from features.cache import CacheScan, EmbeddingCache
from features.config import EmbedConfig
from features.encoders import VideoFramesEncoder, build_encoders
from preprocess.config import MODALITIES
from preprocess.layout import committed_shards, read_index
from preprocess.storage import Store, absolute, filesystem, join, write_atomic, write_json

log = logging.getLogger(__name__)

EMBED_SUMMARY = "embed-summary.json"
EmbedActor = ray.remote(EmbedWorker)


def sidecar_name(shard: str) -> str:
    return shard.removesuffix(".tar") + ".emb.parquet"


def sidecar_digest(keys: list[str], hashes: dict[str, list], identities: dict[str, str], cfg: EmbedConfig) -> str:
    h = hashlib.sha256(json.dumps([keys, hashes, identities, cfg.dtype, bool(cfg.video and cfg.video.keep_frames)],
                                  sort_keys=True).encode())
    return h.hexdigest()


def _vector_column(vectors: list[np.ndarray | None], dim: int, dtype: str) -> pa.Array:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    flat = np.zeros((len(vectors), dim), dtype=dtype)
    present = np.array([v is not None for v in vectors])
    for i, v in enumerate(vectors):
        if v is not None:
            flat[i] = v
    values = pa.array(flat.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~present))


def write_sidecar(shard_url: str, keys: list[str], hashes: dict[str, list], caches: dict[str, tuple],
                  dims: dict[str, int], digest: str, cfg: EmbedConfig, storage_options: dict) -> dict:
    """One Parquet per shard, joinable to the tar by key; nulls where a sample lacks a modality."""
    columns = {"key": pa.array(keys, pa.string())}
    missing = {}
    for modality, per_sample in hashes.items():
        identity, cache_root, parts = caches[modality]
        cache = EmbeddingCache(cache_root, identity, storage_options)
        found = cache.read(parts, {h for h in per_sample if h})
        vectors = [found.get(h) if h else None for h in per_sample]
        missing[modality] = sum(1 for h, v in zip(per_sample, vectors, strict=True) if h and v is None)
        dim = dims[modality]
        if modality == "video":
            frames = [None if v is None else v.reshape(-1, dim) for v in vectors]
            pooled = [None if f is None else VideoFramesEncoder.pooled(f, dim) for f in frames]
            columns["video"] = _vector_column(pooled, dim, cfg.dtype)
            if cfg.video.keep_frames:
                columns["video_frames"] = pa.array(
                    [None if f is None else f.astype(cfg.dtype).tolist() for f in frames],
                    pa.list_(pa.list_(pa.float16() if cfg.dtype == "float16" else pa.float32(), dim)))
        else:
            columns[modality] = _vector_column(vectors, dim, cfg.dtype)
    metadata = {"tessera.digest": digest,
                "tessera.encoders": json.dumps({m: caches[m][0] for m in hashes}),
                "tessera.dims": json.dumps(dims)}
    table = pa.table(columns).replace_schema_metadata(metadata)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs, path = filesystem(shard_url, storage_options)
    write_atomic(fs, path.removesuffix(".tar") + ".emb.parquet", buf.getvalue())
    return missing


_sidecar_task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(write_sidecar)


def _sidecar_is_current(fs, path: str, digest: str) -> bool:
    if not fs.exists(path):
        return False
    try:
        with fs.open(path, "rb") as f:
            metadata = pq.read_schema(f).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return metadata.get(b"tessera.digest", b"").decode() == digest


def _actor_options(cfg: EmbedConfig) -> dict:
    gpus = cfg.gpus_per_actor
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus}


def run_embed_stage(shards: str, cfg: EmbedConfig, storage_options: dict | None = None,
                    progress: bool = True) -> dict:
    """Embed every committed shard of SHARDS; returns (and writes) the stage summary."""
    storage_options = storage_options or {}
    started = time.perf_counter()
    shards = absolute(shards)
    fs, root = filesystem(shards, storage_options)
    names = committed_shards(Store(shards, storage_options))
    index = read_index(Store(shards, storage_options),
                       ["key", "shard", *(f"{m}_payload_sha256" for m in MODALITIES)]).to_pylist()
    encoders = build_encoders(cfg)
    identities = {m: e.identity() for m, e in encoders.items()}
    cache_root = cfg.cache or join(shards, "embed-cache")
    caches = {m: EmbeddingCache(cache_root, identities[m], storage_options) for m in encoders}
    scans: dict[str, CacheScan] = {m: caches[m].scan() for m in encoders}
    corrupt = sorted(p for s in scans.values() for p in s.corrupt)

    # plan: the first sample with a payload not in the cache computes it
    work: dict[str, dict[str, dict[str, str]]] = {}
    counts = {m: {"samples": 0, "unique": 0, "cache_hits": 0, "computed": 0, "errors": 0, "model_seconds": 0.0}
              for m in encoders}
    owned: dict[str, set[str]] = {m: set() for m in encoders}
    for row in index:
        for modality in encoders:
            digest = row[f"{modality}_payload_sha256"]
            if digest is None:
                continue
            counts[modality]["samples"] += 1
            if digest in scans[modality].hashes:
                counts[modality]["cache_hits"] += 1
            elif digest not in owned[modality]:
                owned[modality].add(digest)
                work.setdefault(row["shard"], {}).setdefault(modality, {})[row["key"]] = digest
    for modality in encoders:
        counts[modality]["unique"] = len({r[f"{modality}_payload_sha256"] for r in index} - {None})

    compute_seconds = 0.0
    if work:
        t0 = time.perf_counter()
        needed = sorted({m for per_shard in work.values() for m in per_shard})
        actors = [EmbedActor.options(**_actor_options(cfg)).remote(cfg, needed, cache_root, storage_options)
                  for _ in range(min(cfg.actors, len(work)))]
        pool = ActorPool(actors)
        items = [(join(shards, shard), wanted) for shard, wanted in sorted(work.items())]
        bar = tqdm(total=len(items), unit="shard", desc="embed", disable=not progress)
        for result in pool.map_unordered(lambda actor, item: actor.embed_shard.remote(*item), items):
            for modality, n in result["computed"].items():
                counts[modality]["computed"] += n
                counts[modality]["errors"] += result["errors"][modality]
                counts[modality]["model_seconds"] += round(result["model_seconds"][modality], 3)
            bar.update()
        bar.close()
        for actor in actors:
            ray.kill(actor)
        compute_seconds = time.perf_counter() - t0
        scans = {m: caches[m].scan() for m in encoders}

    # sidecars
    dims = {m: scans[m].dim for m in encoders if scans[m].dim is not None}
    by_shard: dict[str, list[dict]] = {}
    for row in index:
        by_shard.setdefault(row["shard"], []).append(row)
    pending, skipped = [], 0
    for shard in names:
        rows = by_shard.get(shard, [])
        keys = [r["key"] for r in rows]
        hashes = {m: [r[f"{m}_payload_sha256"] for r in rows] for m in dims}
        digest = sidecar_digest(keys, hashes, {m: identities[m] for m in dims}, cfg)
        if _sidecar_is_current(fs, join(root, sidecar_name(shard)), digest):
            skipped += 1
            continue
        cache_refs = {m: (identities[m], cache_root, scans[m].parts) for m in dims}
        pending.append(_sidecar_task.remote(join(shards, shard), keys, hashes, cache_refs, dims, digest, cfg,
                                            storage_options))
    missing = {m: 0 for m in dims}
    for result in ray.get(pending):
        for modality, n in result.items():
            missing[modality] += n

    seconds = time.perf_counter() - started
    summary = {
        "samples": len(index),
        "shards": len(names),
        "sidecars_written": len(pending),
        "sidecars_up_to_date": skipped,
        "encoders": identities,
        "config": cfg.model_dump(mode="json"),  # what rebuilds these encoders (tessera export / predict)
        "dims": dims,
        "modalities": {m: {**c, "missing_in_sidecars": missing.get(m, 0),
                           "embeddings_per_s": round(c["computed"] / compute_seconds, 2) if compute_seconds else None}
                       for m, c in counts.items()},
        "computed": sum(c["computed"] for c in counts.values()),
        "cache_hits": sum(c["cache_hits"] for c in counts.values()),
        "cache_corrupt_parts": corrupt,
        "compute_seconds": round(compute_seconds, 3),
        "seconds": round(seconds, 3),
    }
    write_json(fs, join(root, EMBED_SUMMARY), summary)
    log.info("embedded %d samples: %d computed, %d cache hits, in %.1f s", len(index), summary["computed"],
             summary["cache_hits"], seconds)
    return summary
