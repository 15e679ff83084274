"""Driver of the embedding stage. Its memory does not grow with the corpus: it holds the names
of the shards and running counts; rows and hashes stay in Ray tasks, DuckDB and the cache.

1. State (Ray tasks over groups of shards): a shard's sidecar is current when its digest
   (keys, payload hashes, encoders, output settings) matches; current ones are left alone
   without touching the cache.
2. Plan (one DuckDB query in a Ray task, over the index parts of the other shards): each
   distinct payload goes to the first shard holding it, so identical content costs one
   model call however many shards repeat it. Written to SHARDS/embed-plan.parquet.
3. Encoder actors (`features/actor.py`), shard by shard: look the shard's payloads up in the
   cache (`features/cache.py`, Lance, by key), embed the ones it owns that are missing, add
   them to the cache, write its sidecar from those vectors plus the cached ones. A shard
   whose vector another shard still owes is written at the end (a plain task, lookups only).
4. The caches fold their new rows into their key index."""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter

import pyarrow as pa
import ray
from ray.util import ActorPool
from tqdm import tqdm

from features.actor import EmbedWorker
from features.cache import EmbeddingCache
from features.config import EmbedConfig
from features.encoders import build_encoders
from features.sidecar import ShardRows, sidecar_is_current, write_sidecar
from preprocess.layout import INDEX, committed_shards
from preprocess.storage import Store, duckdb_over

log = logging.getLogger(__name__)

EMBED_SUMMARY = "embed-summary.json"
PLAN = "embed-plan.parquet"
SHARDS_PER_TASK = 64  # shards whose sidecar state one task checks
MEMORY_LIMIT = "256MB"  # the plan query spills beyond this
EmbedActor = ray.remote(EmbedWorker)


def sidecar_states(shards: Store, names: list[str], identities: dict[str, str], cfg: EmbedConfig) -> list[dict]:
    """Per shard: its sidecar digest, whether the sidecar is current, its samples per modality."""
    states = []
    for shard in names:
        rows = ShardRows.read(shards, shard, list(identities))
        digest = rows.digest(identities, cfg)
        samples = {m: len(rows.hashes_of_samples(m)) for m in identities}
        states.append({"shard": shard, "digest": digest, "current": sidecar_is_current(shards, shard, digest),
                       "rows": len(rows.keys), "samples": samples})
    return states


def plan_owners(shards: Store, stale: list[str], modalities: list[str]) -> dict:
    """SHARDS/embed-plan.parquet: (modality, sha256, shard, key) of each distinct payload of the
    STALE shards, given to the first shard (and first sample) holding it; sorted by shard."""
    rows = " UNION ALL ".join(
        f"SELECT '{m}' AS modality, {m}_payload_sha256 AS sha256, shard, key FROM idx "
        f"WHERE duplicate_of IS NULL AND {m}_payload_sha256 IS NOT NULL" for m in modalities)
    with tempfile.TemporaryDirectory(prefix="tessera-embed-plan-") as scratch:
        con = duckdb_over(shards, scratch, MEMORY_LIMIT)
        con.register("stale", pa.table({"shard": stale}))
        con.execute(f"CREATE VIEW idx AS SELECT i.* FROM read_parquet('{shards.url_of(INDEX, 'shard-*.parquet')}') i "
                    "JOIN stale USING (shard)")
        local = f"{scratch}/{PLAN}"
        first = "{'n': length(shard), 's': shard, 'k': key}"  # shard order, then key
        con.execute(f"COPY (SELECT * FROM (SELECT modality, sha256, arg_min(shard, {first}) AS shard, "
                    f"arg_min(key, {first}) AS key FROM ({rows}) GROUP BY modality, sha256) "
                    f"ORDER BY length(shard), shard) TO '{local}' (FORMAT parquet, ROW_GROUP_SIZE 8192)")
        unique = dict(con.execute(f"SELECT modality, count(*) FROM '{local}' GROUP BY modality").fetchall())
        shards.put_file(local, PLAN)
    return unique


def write_owed_sidecar(shards: Store, shard: str, identities: dict[str, str], dims: dict[str, int],
                       cache_root: str, digest: str, cfg: EmbedConfig) -> dict:
    """A sidecar whose vectors other shards computed: lookups only."""
    rows = ShardRows.read(shards, shard, list(identities))
    vectors = {m: EmbeddingCache(cache_root, identities[m], shards.options).lookup(rows.hashes(m))
               for m in identities}
    return write_sidecar(shards, shard, rows, vectors, dims, identities, digest, cfg)


def maintain_cache(cache: EmbeddingCache) -> int:
    cache.maintain()
    return cache.count()


_states_task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(sidecar_states)
_plan_task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(plan_owners)
_owed_task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(write_owed_sidecar)
_maintain_task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(maintain_cache)


def _actor_options(cfg: EmbedConfig) -> dict:
    gpus = cfg.gpus_per_actor
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus}


def run_embed_stage(shards: str, cfg: EmbedConfig, storage_options: dict | None = None,
                    progress: bool = True) -> dict:
    """Embed every committed shard of SHARDS; returns (and writes) the stage summary."""
    started = time.perf_counter()
    store = Store(shards, storage_options)
    names = committed_shards(store)
    encoders = build_encoders(cfg)
    identities = {m: e.identity() for m, e in encoders.items()}
    dims = {m: e.dim for m, e in encoders.items()}  # from their configs: no model is loaded here
    cache_root = cfg.cache or store.url_of("embed-cache")
    counts = {m: Counter(samples=0, unique=0, cache_hits=0, computed=0, errors=0, missing_in_sidecars=0)
              for m in identities}
    model_seconds: Counter = Counter()
    corrupt: list[str] = []

    states = [s for group in ray.get([_states_task.remote(store, names[i : i + SHARDS_PER_TASK], identities, cfg)
                                      for i in range(0, len(names), SHARDS_PER_TASK)]) for s in group]
    stale = [s for s in states if not s["current"]]
    for state in states:
        for modality, n in state["samples"].items():
            counts[modality]["samples"] += n
    written, compute_seconds = 0, 0.0
    if stale and identities:
        for modality, n in ray.get(_plan_task.remote(store, [s["shard"] for s in stale], list(identities))).items():
            counts[modality]["unique"] = n
        t0 = time.perf_counter()
        actors = [EmbedActor.options(**_actor_options(cfg)).remote(cfg, identities, cache_root, store)
                  for _ in range(min(cfg.actors, len(stale)))]
        owed = []
        bar = tqdm(total=len(stale), unit="shard", desc="embed", disable=not progress)
        for result in ActorPool(actors).map_unordered(
                lambda actor, s: actor.embed_shard.remote(s["shard"], PLAN, s["digest"]), stale):
            for modality, n in result["computed"].items():
                counts[modality]["computed"] += n
            for modality, n in result["errors"].items():
                counts[modality]["errors"] += n
            for modality, n in result["missing"].items():
                counts[modality]["missing_in_sidecars"] += n
            model_seconds.update(result["model_seconds"])
            corrupt += result["corrupt"]
            if result["deferred"]:
                owed.append(result["shard"])
            bar.update()
        bar.close()
        ray.get([actor.flush.remote() for actor in actors])  # their last vectors, before the owed sidecars
        for actor in actors:
            ray.kill(actor)
        compute_seconds = time.perf_counter() - t0
        digests = {s["shard"]: s["digest"] for s in stale}
        for missing in ray.get([_owed_task.remote(store, shard, identities, dims, cache_root, digests[shard], cfg)
                                for shard in owed]):
            for modality, n in missing.items():
                counts[modality]["missing_in_sidecars"] += n
        written = len(stale)
        store.remove(PLAN)
    caches = {m: EmbeddingCache(cache_root, identities[m], store.options) for m in identities}
    computed = sum(c["computed"] for c in counts.values())
    cached = dict(zip(caches, ray.get([_maintain_task.remote(c) for c in caches.values()]), strict=True)) \
        if computed else None
    for c in counts.values():
        c["cache_hits"] = c["samples"] - c["computed"]
    summary = {
        "samples": sum(s["rows"] for s in states),
        "shards": len(names),
        "sidecars_written": written,
        "sidecars_up_to_date": len(states) - len(stale),
        "encoders": identities,
        "config": cfg.model_dump(mode="json"),  # what rebuilds these encoders (tessera export / predict)
        "dims": dims,
        "modalities": {m: {**c, "model_seconds": round(model_seconds[m], 3),
                           "embeddings_per_s": round(c["computed"] / compute_seconds, 2) if compute_seconds else None}
                       for m, c in counts.items()},
        "computed": computed,
        "cache_hits": sum(c["cache_hits"] for c in counts.values()),
        "cache_rows": cached,
        "cache_corrupt": corrupt,
        "compute_seconds": round(compute_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
    store.write_json(EMBED_SUMMARY, summary)
    log.info("embedded %d shards: %d computed, %d cache hits, %d sidecars written, in %.1f s", len(names),
             summary["computed"], summary["cache_hits"], written, summary["seconds"])
    return summary
