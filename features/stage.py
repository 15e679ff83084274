"""Driver of the embedding stage: plan, run, summarize. Its memory does not grow with the
corpus: it holds the names of the shards and running counts; rows and hashes stay in Ray
tasks, DuckDB and the cache.

1. Plan. Ray tasks over groups of shards find each sidecar's state: current when its digest
   (keys, payload hashes, encoders, output settings) matches; current ones are left alone
   without touching the cache. One DuckDB query (a Ray task, over the index parts of the
   others) gives each distinct payload to the first shard holding it, so identical content
   costs one model call however many shards repeat it (features/layout.py: PLAN).
2. Run. Encoder actors (`features/actor.py`), shard by shard through the bounded runner: look
   the shard's payloads up in the cache (`features/cache.py`, Lance, by key), embed the ones
   it owns that are missing, add them to the cache, write its sidecar from those vectors
   plus the cached ones. A shard whose vector another shard still owes is written at the end
   (a plain task, lookups only). The caches then fold their new rows into their key index.
3. Summary: EmbedSummary, written last."""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import ray
from tqdm import tqdm

from features.actor import EmbedWorker
from features.cache import EmbeddingCache
from features.config import EmbedConfig
from features.encoders import build_encoders
from features.layout import CACHE, PLAN, EmbedSummary
from features.sidecar import ShardRows, sidecar_is_current, write_sidecar
from preprocess.layout import INDEX, committed_shards
from preprocess.runner import StageWork, actor, in_flight_limit, task
from preprocess.storage import Store

log = logging.getLogger(__name__)

SHARDS_PER_TASK = 64  # shards whose sidecar state one task checks
MEMORY_LIMIT = "256MB"  # the plan query spills beyond this
EmbedActor = actor(EmbedWorker)


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
    with tempfile.TemporaryDirectory(prefix="tessera-plan-") as scratch, shards.duckdb(scratch, MEMORY_LIMIT) as con:
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
                       cache: Store, digest: str, cfg: EmbedConfig) -> dict:
    """A sidecar whose vectors other shards computed: lookups only."""
    rows = ShardRows.read(shards, shard, list(identities))
    vectors = {m: EmbeddingCache(cache, identities[m]).lookup(rows.hashes(m)) for m in identities}
    return write_sidecar(shards, shard, rows, vectors, dims, identities, digest, cfg)


def maintain_cache(cache: EmbeddingCache) -> int:
    cache.maintain()
    return cache.count()


_states_task = task(sidecar_states, num_cpus=1, max_retries=3, retry_exceptions=[OSError])
_plan_task = task(plan_owners, num_cpus=1, max_retries=2, retry_exceptions=[OSError])
_owed_task = task(write_owed_sidecar, num_cpus=1, max_retries=3, retry_exceptions=[OSError])
_maintain_task = task(maintain_cache, num_cpus=1, max_retries=2, retry_exceptions=[OSError])


@dataclass(frozen=True)
class EmbedPlan:
    """What an embedding run has to do, known before any model loads."""

    shards: Store
    cache: Store
    names: list[str]  # the committed shards
    identities: dict[str, str]  # modality -> encoder identity
    dims: dict[str, int]  # from the encoders' configs: no model is loaded here
    states: list[dict]  # per shard, in order: sidecar_states

    @property
    def stale(self) -> list[dict]:
        return [s for s in self.states if not s["current"]]


def plan_embedding(shards: Store, cfg: EmbedConfig, cache: Store, work: StageWork) -> EmbedPlan:
    names = committed_shards(shards)
    encoders = build_encoders(cfg)
    identities = {m: e.identity() for m, e in encoders.items()}
    groups = [names[i : i + SHARDS_PER_TASK] for i in range(0, len(names), SHARDS_PER_TASK)]
    found: dict[int, list[dict]] = {}
    work.run(range(len(groups)), lambda g, _: _states_task.remote(shards, groups[g], identities, cfg),
             in_flight_limit(), found.__setitem__)
    return EmbedPlan(shards, cache, names, identities, {m: e.dim for m, e in encoders.items()},
                     [s for g in range(len(groups)) for s in found[g]])


class EmbedTally:
    """Per modality: samples, distinct payloads, computed, errors, vectors missing from sidecars,
    model seconds; the shards whose sidecar waits for another shard's vectors."""

    def __init__(self, plan: EmbedPlan):
        self.counts = {m: Counter(samples=0, unique=0, cache_hits=0, computed=0, errors=0, missing_in_sidecars=0)
                       for m in plan.identities}
        for state in plan.states:
            for modality, n in state["samples"].items():
                self.counts[modality]["samples"] += n
        self.model_seconds: Counter = Counter()
        self.corrupt: list[str] = []
        self.owed: list[str] = []

    def embedded(self, state: dict, result: dict) -> None:
        for modality, n in result["computed"].items():
            self.counts[modality]["computed"] += n
        for modality, n in result["errors"].items():
            self.counts[modality]["errors"] += n
        self.missing(result["missing"])
        self.model_seconds.update(result["model_seconds"])
        self.corrupt += result["corrupt"]
        if result["deferred"]:
            self.owed.append(result["shard"])

    def missing(self, per_modality: dict[str, int]) -> None:
        for modality, n in per_modality.items():
            self.counts[modality]["missing_in_sidecars"] += n

    @property
    def computed(self) -> int:
        return sum(c["computed"] for c in self.counts.values())


def _actor_options(cfg: EmbedConfig) -> dict:
    gpus = cfg.gpus_per_actor
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus}


def embed_stale(plan: EmbedPlan, cfg: EmbedConfig, tally: EmbedTally, work: StageWork, progress: bool) -> None:
    """Embed the stale shards on encoder actors, then write the sidecars they left owed."""
    stale = plan.stale
    for modality, n in work.get(_plan_task.remote(plan.shards, [s["shard"] for s in stale],
                                                  list(plan.identities))).items():
        tally.counts[modality]["unique"] = n
    actors = [EmbedActor.options(**_actor_options(cfg)).remote(cfg, plan.identities, plan.cache, plan.shards)
              for _ in range(min(cfg.actors, len(stale)))]
    bar = tqdm(total=len(stale), unit="shard", desc="embed", disable=not progress)

    def embedded(state: dict, result: dict) -> None:
        tally.embedded(state, result)
        bar.update()

    work.run(stale, lambda s, slot: actors[slot].call.remote("embed_shard", s["shard"], PLAN, s["digest"]),
             len(actors), embedded)
    bar.close()
    work.get_all([a.call.remote("flush") for a in actors])  # their last vectors, before the owed sidecars
    for a in actors:
        ray.kill(a)
    digests = {s["shard"]: s["digest"] for s in stale}
    for missing in work.get_all([_owed_task.remote(plan.shards, shard, plan.identities, plan.dims, plan.cache,
                                                   digests[shard], cfg) for shard in tally.owed]):
        tally.missing(missing)
    plan.shards.remove(PLAN)


def run_embed_stage(shards: Store, cfg: EmbedConfig, cache: Store | None = None,
                    progress: bool = True) -> EmbedSummary:
    """Embed every committed shard of SHARDS, with the vectors cached in CACHE (default: the
    store of embed.cache, else SHARDS/embed-cache); returns (and writes) the stage summary."""
    started, work = time.perf_counter(), StageWork()
    cache = cache or (shards.at(cfg.cache) if cfg.cache else shards.child(CACHE))
    plan = plan_embedding(shards, cfg, cache, work)
    tally = EmbedTally(plan)
    compute_seconds = 0.0
    if plan.stale and plan.identities:
        t0 = time.perf_counter()
        embed_stale(plan, cfg, tally, work, progress)
        compute_seconds = time.perf_counter() - t0
    caches = {m: EmbeddingCache(cache, plan.identities[m]) for m in plan.identities}
    cache_rows = dict(zip(caches, work.get_all([_maintain_task.remote(c) for c in caches.values()]), strict=True)) \
        if tally.computed else None
    for c in tally.counts.values():
        c["cache_hits"] = c["samples"] - c["computed"]
    written = len(plan.stale) if plan.identities else 0
    summary = EmbedSummary(
        samples=sum(s["rows"] for s in plan.states),
        shards=len(plan.names),
        sidecars_written=written,
        sidecars_up_to_date=len(plan.states) - len(plan.stale),
        encoders=plan.identities,
        config=cfg.model_dump(mode="json"),
        dims=plan.dims,
        modalities={m: {**c, "model_seconds": round(tally.model_seconds[m], 3),
                        "embeddings_per_s": round(c["computed"] / compute_seconds, 2) if compute_seconds else None}
                    for m, c in tally.counts.items()},
        computed=tally.computed,
        cache_hits=sum(c["cache_hits"] for c in tally.counts.values()),
        cache_rows=cache_rows,
        cache_corrupt=tally.corrupt,
        compute_seconds=round(compute_seconds, 3),
        seconds=round(time.perf_counter() - started, 3),
        store_retries=work.store_retries,
        up_to_date=tally.computed == 0 and written == 0,
    )
    summary.write(shards)
    log.info("embedded %d shards: %d computed, %d cache hits, %d sidecars written, in %.1f s", len(plan.names),
             summary.computed, summary.cache_hits, written, summary.seconds)
    return summary
