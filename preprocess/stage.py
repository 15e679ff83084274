"""The shard stage (`ShardStage`, run by core/engine.py): plan (shard i holds the manifest's
i-th run of rows), run the uncommitted plans as Ray tasks, run the dedup pass, summarize.

Its memory does not grow with the manifest: it holds the plans in flight, the indices of the
shards already committed and running totals — never rows, keys or hashes."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from tessera.core.engine import Stage, StageRun, execute
from tessera.core.errors import OutputConflict, StageFailed
from tessera.core.lease import DEFAULT_LEASE, Fence, LeaseConfig
from tessera.core.runner import task
from tessera.core.storage import Store
from tessera.core.versions import INDEX
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.dedup import DedupResult, find_duplicates, mark_duplicates
from tessera.preprocess.layout import (
    MARKER,
    REJECTS,
    SHARD_FILES,
    ShardMarker,
    ShardSummary,
    check_output,
    claim_output,
    committed_shards,
    current_summary,
    damaged,
    record_sizes,
    shard_stem,
)
from tessera.preprocess.manifest import ManifestSource, chunks
from tessera.preprocess.shard import ShardPlan, write_shard
from tessera.preprocess.stats import DatasetStats

log = logging.getLogger(__name__)

RESUME_BATCH = 256  # committed markers read (and checked against their plans) at a time

_shard_task = task(write_shard, num_cpus=1, scheduling_strategy="SPREAD")
_dedup_task = task(find_duplicates, num_cpus=1, max_retries=2)
_mark_task = task(mark_duplicates, num_cpus=1)


def plan_shards(source: ManifestSource, cfg: ShardConfig) -> Iterator[ShardPlan]:
    """Shard i holds the manifest's i-th run of `samples_per_shard` rows: fixed by the manifest
    and the config alone, before anything is read."""
    digest = cfg.digest()
    for index, chunk in enumerate(chunks(source, cfg.samples_per_shard)):
        yield ShardPlan(index, chunk, digest)


class Totals:
    """Running sums of shard markers: what the summary reports."""

    def __init__(self):
        self.inputs = self.written = self.rejected = self.shards = self.bytes = 0
        self.codes: Counter = Counter()
        self.stats = DatasetStats()

    def add(self, marker: ShardMarker) -> None:
        self.inputs += marker.rows
        self.written += marker.written
        self.rejected += marker.rejected
        self.shards += 1
        self.bytes += marker.bytes
        self.codes.update(marker.rejected_by_code)
        self.stats = self.stats.merge(DatasetStats.from_dict(marker.stats))


def resumed_markers(out: Store, plans: list[ShardPlan]) -> list[ShardMarker]:
    """The markers of shards already committed; each must be for exactly its plan."""
    got = out.read_many([out.url_of(p.name + ".json") for p in plans])
    markers = []
    for plan in plans:
        marker = ShardMarker.from_json(json.loads(got[out.url_of(plan.name + ".json")]))
        if marker.plan_digest != plan.plan_digest:
            raise OutputConflict(f"{out.url_of(plan.name + '.json')} was committed for other inputs than this "
                                 "manifest plans; write to a new output, or delete it first")
        markers.append(marker)
    return markers


class ShardProgress:
    """What the driver tallies while the plans go by: every committed shard's marker (those an
    earlier run left, checked in batches, and the fresh ones as their tasks finish), the bar."""

    def __init__(self, out: Store, run: StageRun):
        self.out = out
        self.started = time.perf_counter()
        self.all, self.fresh = Totals(), Totals()
        self.planned = self.resumed = 0
        self.bar = run.bar("shard", unit="shard")

    def to_write(self, plans: Iterable[ShardPlan], committed: set[int]) -> Iterator[ShardPlan]:
        """The plans whose shard is not committed yet."""
        waiting: list[ShardPlan] = []
        for plan in plans:
            self.planned += 1
            if plan.index not in committed:
                yield plan
                continue
            waiting.append(plan)
            if len(waiting) == RESUME_BATCH:
                self._resume(waiting)
                waiting = []
        self._resume(waiting)
        self.bar.total = self.planned
        self.bar.refresh()

    def _resume(self, plans: list[ShardPlan]) -> None:
        for marker in resumed_markers(self.out, plans) if plans else ():
            self.all.add(marker)
        self.resumed += len(plans)
        self.bar.update(len(plans))

    def written(self, plan: ShardPlan, marker: ShardMarker) -> None:
        self.all.add(marker)
        self.fresh.add(marker)
        self.bar.update()
        self.bar.set_postfix(samples_per_s=f"{self.fresh.written / (time.perf_counter() - self.started):.1f}")


def sweep_temporaries(out: Store) -> None:
    """Remove the temporaries a killed run left (a name that ends in .tmp-<id>)."""
    for folder in ("", INDEX + "/", REJECTS + "/"):
        for stale in out.names(f"{folder}*.tmp-*"):
            out.remove(stale)


def redo_damaged(out: Store, fence: Fence) -> None:
    """Uncommit the shards whose committed files are gone or cut (their markers removed: the run
    writes them again, byte for byte); a damaged file of the whole folder (the dedup list) is
    written again by the dedup pass, which every run that writes runs."""
    found = damaged(out, SHARD_FILES)
    shards = sorted({d.shard for d in found if d.shard is not None})
    if found:
        log.warning("shard: %d committed files are damaged (%s): their %d shards are written again", len(found),
                    ", ".join(map(str, found[:5])), len(shards))
    for number in shards:
        marker = shard_stem(number) + ".json"
        fence.check(f"uncommitting {marker}")
        if out.exists(marker):
            out.remove(marker)


class ShardStage(Stage[ShardSummary]):
    """The manifest at URL MANIFEST (read through OUT's options) into OUT's shards, deduped
    against each other and against the live rows of EARLIER dataset versions (a refresh's)."""

    command = "tessera shard"

    def __init__(self, manifest: str, out: Store, cfg: ShardConfig, earlier: Sequence[Store] = ()):
        self.folder, self.cfg, self.earlier = out, cfg, list(earlier)
        self.source = ManifestSource.open(manifest, out)

    def current(self) -> ShardSummary | None:
        """OUT's summary when it is complete for this manifest and config (no input opened);
        OutputConflict when it holds another's."""
        check_output(self.folder, self.cfg, self.source)
        return current_summary(self.folder, self.cfg, self.source)

    def run(self, run: StageRun) -> ShardSummary:
        out, cfg, source = self.folder, self.cfg, self.source
        claim_output(out, cfg, source)
        sweep_temporaries(out)  # (the lease holder's own, or an expired holder's: no one else writes here)
        redo_damaged(out, run.fence)
        committed = {int(MARKER.fullmatch(name.removesuffix(".tar") + ".json").group(1))
                     for name in committed_shards(out)}
        tally = ShardProgress(out, run)
        import ray

        cfg_ref = ray.put(cfg)
        run.map(tally.to_write(plan_shards(source, cfg), committed),
                lambda plan, _: _shard_task.remote(plan, cfg_ref, out, run.fence), tally.written)
        tally.bar.close()
        if tally.resumed:
            log.info("resumed: %d of %d shards were already committed", tally.resumed, tally.planned)
        dedup = DedupResult({}, [])
        if tally.all.written:
            dedup = run.get(_dedup_task.remote(out, cfg, run.fence, self.earlier))
            run.get_all([_mark_task.remote(out, group, run.fence) for group in dedup.shard_groups])
        record_sizes(out, SHARD_FILES, run.fence)
        totals, seconds = tally.all, time.perf_counter() - tally.started
        summary = ShardSummary(
            inputs=totals.inputs,
            accepted=totals.written - dedup.duplicates,
            rejected=totals.rejected + dedup.duplicates,
            rejected_by_code=dict(sorted((totals.codes + Counter(dedup.rejected_by_code)).items())),
            # (a key repeated within a shard is rejected by its task, one across shards by the dedup pass)
            duplicates=dedup.duplicates + totals.codes.get("dedup.duplicate_key", 0),
            shards=tally.planned,
            bytes=totals.bytes,
            statistics=totals.stats.summary(),
            config_digest=cfg.digest(),
            manifest={"url": source.url, "fingerprint": source.fingerprint, "files": len(source.files)},
            resumed_shards=tally.resumed,
            shards_by_node=dict(run.work.nodes),
            samples_per_s=round(tally.fresh.written / seconds, 2),
            up_to_date=tally.resumed == tally.planned,
        )
        log.info("%d accepted, %d rejected (%d duplicates), %d shards in %.1f s", summary.accepted,
                 summary.rejected, summary.duplicates, summary.shards, seconds)
        return summary

    def check(self, summary: ShardSummary) -> ShardSummary:
        """SUMMARY, unless the stage rejected more than shard.max_reject_fraction of its inputs (a
        broken mount, a wrong root): then StageFailed, with the top codes (everything is written).
        Duplicates do not count: a corpus may well repeat itself."""
        limit, rejected = self.cfg.max_reject_fraction, summary.rejected - summary.duplicates
        if limit is None or not summary.inputs or rejected / summary.inputs <= limit:
            return summary
        top = sorted(summary.rejected_by_code.items(), key=lambda item: -item[1])[:5]
        raise StageFailed(f"shard: {rejected} of {summary.inputs} inputs rejected, duplicates aside "
                          f"({rejected / summary.inputs:.0%}, over shard.max_reject_fraction {limit}); "
                          f"every shard and reject line is written (tessera rejects OUT). Top codes: "
                          + "; ".join(f"{n} x {code}" for code, n in top))


def run_shard_stage(manifest: str, out: Store, cfg: ShardConfig, progress: bool = True,
                    lease: LeaseConfig | Fence = DEFAULT_LEASE, earlier: Sequence[Store] = ()) -> ShardSummary:
    """ShardStage through the engine, holding OUT's lease (or under LEASE, the fence of a caller
    that holds it); Ray must be initialized. Returns the summary."""
    return execute(ShardStage(manifest, out, cfg, earlier), lease, progress)
