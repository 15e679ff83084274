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
3. Summary: EmbedSummary (written last by the engine, core/engine.py)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import ray

from tessera.core.engine import Stage, StageRun, execute
from tessera.core.errors import StageFailed
from tessera.core.lease import DEFAULT_LEASE, Fence, LeaseConfig
from tessera.core.runner import actor, task
from tessera.core.storage import Store
from tessera.core.versions import INDEX
from tessera.features.actor import EmbedShardResult, EmbedWorker
from tessera.features.cache import EmbeddingCache
from tessera.features.config import EmbedConfig
from tessera.features.encoders import build_encoders
from tessera.features.layout import CACHE, PLAN, SIDECARS, EmbedSummary, sidecar_name
from tessera.features.sidecar import ShardRows, sidecar_is_current, write_sidecar
from tessera.preprocess.layout import SHARD_FILES, check_damage, committed_shards, damaged, record_sizes

log = logging.getLogger(__name__)

SHARDS_PER_TASK = 64  # shards whose sidecar state one task checks
MAX_ROUNDS = 3  # of embedding what an earlier round of the same run left missing
# An actor lost with its node is restarted (elsewhere, if need be: up to 4 times) and its calls are
# made again once it is back, however long that takes (a call fails when the actor is gone for good)
EmbedActor = actor(EmbedWorker, ("embed_shard", "flush"), max_restarts=4, max_task_retries=-1)


@dataclass(frozen=True)
class SidecarState:
    """A shard's sidecar as planning finds it."""

    shard: str
    digest: str  # what its sidecar must be written for (keys, payloads, encoders, settings)
    current: bool
    rows: int  # the shard's kept samples
    samples: dict[str, int]  # per modality: the samples that have it


def sidecar_states(shards: Store, names: list[str], identities: dict[str, str], cfg: EmbedConfig
                   ) -> list[SidecarState]:
    """Per shard: its sidecar digest, whether the sidecar is current, its samples per modality."""
    states = []
    for shard in names:
        rows = ShardRows.read(shards, shard, list(identities))
        digest = rows.digest(identities, cfg)
        states.append(SidecarState(shard, digest, sidecar_is_current(shards, shard, digest), len(rows.keys),
                                   {m: len(rows.hashes_of_samples(m)) for m in identities}))
    return states


@dataclass(frozen=True)
class OwnerPlan:
    """What plan_owners wrote: the distinct payloads of the stale shards, per modality."""

    unique: dict[str, int]


def plan_owners(shards: Store, stale: list[str], modalities: list[str], fence: Fence) -> OwnerPlan:
    """SHARDS/embed-plan.parquet: (modality, sha256, shard, key) of each distinct payload of the
    STALE shards, given to the first shard (and first sample) holding it; sorted by shard."""
    rows = " UNION ALL ".join(
        f"SELECT '{m}' AS modality, {m}_payload_sha256 AS sha256, shard, key FROM idx "
        f"WHERE duplicate_of IS NULL AND {m}_payload_sha256 IS NOT NULL" for m in modalities)
    with shards.duckdb() as (con, scratch):
        con.register("stale", pa.table({"shard": stale}))
        con.execute(f"CREATE VIEW idx AS SELECT i.* FROM read_parquet({shards.sql_url(INDEX, 'shard-*.parquet')}) i "
                    "JOIN stale USING (shard)")
        local = f"{scratch}/{PLAN}"
        first = "{'n': length(shard), 's': shard, 'k': key}"  # shard order, then key
        con.execute(f"COPY (SELECT * FROM (SELECT modality, sha256, arg_min(shard, {first}) AS shard, "
                    f"arg_min(key, {first}) AS key FROM ({rows}) GROUP BY modality, sha256) "
                    f"ORDER BY length(shard), shard) TO '{local}' (FORMAT parquet, ROW_GROUP_SIZE 8192)")
        unique = dict(con.execute(f"SELECT modality, count(*) FROM '{local}' GROUP BY modality").fetchall())
        fence.check(PLAN)
        shards.put_file(local, PLAN)
    return OwnerPlan(unique)


@dataclass(frozen=True)
class OwedSidecar:
    """A sidecar written from vectors other shards computed: the vectors still missing."""

    missing: dict[str, int]


def write_owed_sidecar(shards: Store, shard: str, identities: dict[str, str], dims: dict[str, int],
                       cache: Store, digest: str, cfg: EmbedConfig, fence: Fence) -> OwedSidecar:
    """A sidecar whose vectors other shards computed: lookups only."""
    rows = ShardRows.read(shards, shard, list(identities))
    vectors = {m: EmbeddingCache(cache, identities[m]).lookup(rows.hashes(m)) for m in identities}
    fence.check(sidecar_name(shard))
    return OwedSidecar(write_sidecar(shards, shard, rows, vectors, dims, identities, digest, cfg))


def maintain_cache(cache: EmbeddingCache) -> int:
    cache.maintain()
    return cache.count()


_states_task = task(sidecar_states, num_cpus=1)
_plan_task = task(plan_owners, num_cpus=1, max_retries=2)
_owed_task = task(write_owed_sidecar, num_cpus=1)
_maintain_task = task(maintain_cache, num_cpus=1, max_retries=2)


@dataclass(frozen=True)
class EmbedPlan:
    """What an embedding run has to do, known before any model loads."""

    shards: Store
    cache: Store
    fence: Fence  # the run's lease on SHARDS
    names: list[str]  # the committed shards
    identities: dict[str, str]  # modality -> encoder identity
    dims: dict[str, int]  # from the encoders' configs: no model is loaded here
    states: list[SidecarState]  # per shard, in order

    @property
    def stale(self) -> list[SidecarState]:
        return [s for s in self.states if not s.current]


def plan_embedding(shards: Store, cfg: EmbedConfig, cache: Store, run: StageRun) -> EmbedPlan:
    """The sidecars' states; a sidecar that is gone or cut since it was committed is stale."""
    check_damage(shards, SHARD_FILES, "`tessera shard` (or the job that made them) run again")
    names = committed_shards(shards)
    encoders = build_encoders(cfg)
    identities = {m: e.identity() for m, e in encoders.items()}
    groups = [names[i : i + SHARDS_PER_TASK] for i in range(0, len(names), SHARDS_PER_TASK)]
    found: dict[int, list[SidecarState]] = {}
    run.map(range(len(groups)), lambda g, _: _states_task.remote(shards, groups[g], identities, cfg),
            found.__setitem__)
    cut = {d.name for d in damaged(shards, (SIDECARS,))}
    states = [dataclasses.replace(s, current=False) if sidecar_name(s.shard) in cut else s
              for g in range(len(groups)) for s in found[g]]
    return EmbedPlan(shards, cache, run.fence, names, identities, {m: e.dim for m, e in encoders.items()}, states)


class EmbedTally:
    """One round's counts per modality: samples, distinct payloads, computed, errors (and their
    reasons), vectors missing from sidecars, model seconds; the shards whose sidecar waits for
    another shard's vectors."""

    def __init__(self, plan: EmbedPlan):
        self.counts = {m: Counter(samples=0, unique=0, cache_hits=0, computed=0, errors=0, missing_in_sidecars=0)
                       for m in plan.identities}
        for state in plan.states:
            for modality, n in state.samples.items():
                self.counts[modality]["samples"] += n
        self.model_seconds: Counter = Counter()
        self.reasons: Counter = Counter()
        self.corrupt: list[str] = []
        self.owed: list[str] = []

    def embedded(self, state: SidecarState, result: EmbedShardResult) -> None:
        for modality, n in result.computed.items():
            self.counts[modality]["computed"] += n
        for modality, n in result.errors.items():
            self.counts[modality]["errors"] += n
        self.reasons.update(result.error_reasons)
        self.missing(result.missing)
        self.model_seconds.update(result.model_seconds)
        self.corrupt += result.corrupt
        if result.deferred:
            self.owed.append(result.shard)

    def missing(self, per_modality: dict[str, int]) -> None:
        for modality, n in per_modality.items():
            self.counts[modality]["missing_in_sidecars"] += n

    def total(self, what: str) -> int:
        return sum(c[what] for c in self.counts.values())

    def then(self, later: EmbedTally) -> EmbedTally:
        """This round followed by a LATER one that redid what it left missing: computed and
        model time add up; errors and missing vectors are the later round's."""
        for modality, c in self.counts.items():
            c["computed"] += later.counts[modality]["computed"]
            c["errors"] = later.counts[modality]["errors"]
            c["missing_in_sidecars"] = later.counts[modality]["missing_in_sidecars"]
        self.model_seconds.update(later.model_seconds)
        self.reasons, self.corrupt = later.reasons, self.corrupt + later.corrupt
        return self


def _actor_options(cfg: EmbedConfig) -> dict:
    resources = ray.cluster_resources()
    gpus = cfg.gpus_per_actor
    if gpus == "auto":
        gpus = 1 if resources.get("GPU", 0) > 0 else 0
    if resources.get("CPU", 0) < cfg.cpus_per_actor or resources.get("GPU", 0) < gpus:
        log.warning("an encoder actor asks for %s CPUs and %s GPUs; the cluster has %s and %s now: the actors wait "
                    "until it grows (lower embed.cpus_per_actor on a small machine)", cfg.cpus_per_actor, gpus,
                    resources.get("CPU", 0), resources.get("GPU", 0))
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus}


def embed_stale(plan: EmbedPlan, cfg: EmbedConfig, tally: EmbedTally, run: StageRun) -> None:
    """Embed the stale shards on encoder actors, then write the sidecars they left owed."""
    stale = plan.stale
    owners = run.get(_plan_task.remote(plan.shards, [s.shard for s in stale], list(plan.identities), plan.fence))
    for modality, n in owners.unique.items():
        tally.counts[modality]["unique"] = n
    actors = [EmbedActor.options(**_actor_options(cfg)).remote(cfg, plan.identities, plan.cache, plan.shards,
                                                               plan.fence)
              for _ in range(min(cfg.actors, len(stale)))]
    bar = run.bar("embed", total=len(stale), unit="shard")

    def embedded(state: SidecarState, result: EmbedShardResult) -> None:
        tally.embedded(state, result)
        bar.update()

    run.map(stale, lambda s, slot: actors[slot].embed_shard.remote(s.shard, PLAN, s.digest), embedded,
            limit=len(actors))
    bar.close()
    run.get_all([a.flush.remote() for a in actors])  # their last vectors, before the owed sidecars
    for a in actors:
        ray.kill(a)
    digests = {s.shard: s.digest for s in stale}
    for owed in run.get_all([_owed_task.remote(plan.shards, shard, plan.identities, plan.dims, plan.cache,
                                               digests[shard], cfg, plan.fence) for shard in tally.owed]):
        tally.missing(owed.missing)
    plan.shards.remove(PLAN)


class EmbedStage(Stage[EmbedSummary]):
    """Embed every committed shard of SHARDS with the vectors cached in CACHE (default: the store
    of embed.cache, else SHARDS/embed-cache)."""

    command = "tessera embed"

    def __init__(self, shards: Store, cfg: EmbedConfig, cache: Store | None = None):
        self.folder, self.cfg = shards, cfg
        self.cache = cache or (shards.at(cfg.cache) if cfg.cache else shards.child(CACHE))

    def run(self, run: StageRun) -> EmbedSummary:
        shards, cfg, cache = self.folder, self.cfg, self.cache
        plan = first = plan_embedding(shards, cfg, cache, run)
        tally = EmbedTally(plan)
        compute_seconds, rounds = 0.0, 0
        # A round leaves a sidecar incomplete when a batch failed, or when the actor that computed a
        # vector another shard needed was lost before the vector reached the cache: the next round
        # redoes those (and only those: the rest are cached), as long as it gets anywhere.
        while plan.stale and plan.identities and rounds < MAX_ROUNDS:
            t0, this = time.perf_counter(), EmbedTally(plan)
            embed_stale(plan, cfg, this, run)
            compute_seconds += time.perf_counter() - t0
            tally = this if rounds == 0 else tally.then(this)
            rounds += 1
            if not this.total("missing_in_sidecars") or not this.total("computed"):
                break
            plan = plan_embedding(shards, cfg, cache, run)
        plan = first
        caches = {m: EmbeddingCache(cache, plan.identities[m]) for m in plan.identities}
        cache_rows = dict(zip(caches, run.get_all([_maintain_task.remote(c) for c in caches.values()]), strict=True)) \
            if tally.total("computed") else None
        for modality, c in tally.counts.items():  # of the samples whose sidecar was (re)written; current ones read none
            c["cache_hits"] = sum(s.samples.get(modality, 0) for s in plan.stale) - c["computed"]
        written = len(plan.stale) if plan.identities else 0
        if written:
            record_sizes(shards, (SIDECARS,), run.fence)
        summary = EmbedSummary(
            samples=sum(s.rows for s in plan.states),
            shards=len(plan.names),
            sidecars_written=written,
            sidecars_up_to_date=len(plan.states) - len(plan.stale),
            encoders=plan.identities,
            config=cfg.model_dump(mode="json"),
            dims=plan.dims,
            modalities={m: {**c, "model_seconds": round(tally.model_seconds[m], 3),
                            "embeddings_per_s": round(c["computed"] / compute_seconds, 2) if compute_seconds else None}
                        for m, c in tally.counts.items()},
            computed=tally.total("computed"),
            errors=tally.total("errors"),
            error_reasons=dict(tally.reasons.most_common()),
            rounds=rounds,
            cache_hits=sum(c["cache_hits"] for c in tally.counts.values()),
            cache_rows=cache_rows,
            cache_corrupt=tally.corrupt,
            compute_seconds=round(compute_seconds, 3),
            up_to_date=tally.total("computed") == 0 and written == 0,
        )
        log.info("embedded %d shards: %d vectors computed, %d vectors from the cache, %d sidecars written "
                 "(%d up to date)", len(plan.names), summary.computed, summary.cache_hits, written,
                 summary.sidecars_up_to_date)
        return summary

    def check(self, summary: EmbedSummary) -> EmbedSummary:
        """SUMMARY, unless more vectors failed than embed.max_errors: then StageFailed."""
        cfg = self.cfg
        limit = cfg.max_errors if cfg.max_errors is None or cfg.max_errors >= 1 else cfg.max_errors * summary.samples
        if limit is not None and summary.errors > limit:
            raise StageFailed(f"embed: {summary.errors} vectors could not be computed (embed.max_errors "
                              f"{cfg.max_errors}); their sidecars are incomplete, the next run tries them again. "
                              "Reasons: " + "; ".join(f"{n} x {reason}"
                                                      for reason, n in list(summary.error_reasons.items())[:5]))
        return summary


def run_embed_stage(shards: Store, cfg: EmbedConfig, cache: Store | None = None, progress: bool = True,
                    lease: LeaseConfig | Fence = DEFAULT_LEASE) -> EmbedSummary:
    """EmbedStage through the engine, holding SHARDS' lease (or under LEASE, the fence of a caller
    that holds it); Ray must be initialized. Returns the summary."""
    return execute(EmbedStage(shards, cfg, cache), lease, progress)
