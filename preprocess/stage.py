"""Driver of the shard stage: stream shard plans (chunks of manifest rows) to Ray tasks with a
bounded number in flight, resume from committed shards, run the dedup pass, write summary.json.

Its memory does not grow with the manifest: it holds the plans in flight, the indices of the
shards already committed and running totals — never rows, keys or hashes."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator

import ray
from tqdm import tqdm

from preprocess.config import ShardConfig
from preprocess.dedup import find_duplicates, mark_duplicates
from preprocess.layout import (
    INDEX,
    MARKER,
    REJECTS,
    SUMMARY,
    OutputConflict,
    claim_output,
    committed_shards,
    current_summary,
)
from preprocess.manifest import ManifestSource, chunks
from preprocess.shard import ShardPlan, write_shard
from preprocess.stats import DatasetStats
from preprocess.storage import Store, read_many

log = logging.getLogger(__name__)

RESUME_BATCH = 256  # committed markers read (and checked against their plans) at a time


def _write_shard_reporting_node(plan: ShardPlan, cfg: ShardConfig, out: Store):
    return write_shard(plan, cfg, out), ray.get_runtime_context().get_node_id()


# Tasks are idempotent (temporary names + rename, marker last), so Ray may retry them on node
# loss and on I/O errors of the store.
_shard_task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError], scheduling_strategy="SPREAD")(
    _write_shard_reporting_node)
_dedup_task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(find_duplicates)
_mark_task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(mark_duplicates)


def plan_shards(source: ManifestSource, cfg: ShardConfig, storage_options: dict | None = None
                ) -> Iterator[ShardPlan]:
    """Shard i holds the manifest's i-th run of `samples_per_shard` rows: fixed by the manifest
    and the config alone, before anything is read."""
    digest = cfg.digest()
    for index, chunk in enumerate(chunks(source, cfg.samples_per_shard, storage_options)):
        yield ShardPlan(index, chunk, digest)


class Totals:
    """Running sums of the shard markers: what summary.json reports."""

    def __init__(self):
        self.inputs = self.written = self.rejected = self.shards = self.bytes = 0
        self.reasons: Counter = Counter()
        self.stats = DatasetStats()

    def add(self, marker: dict) -> None:
        self.inputs += marker["rows"]
        self.written += marker["written"]
        self.rejected += marker["rejected"]
        self.shards += 1
        self.bytes += marker["bytes"]
        self.reasons.update(marker["rejected_by_reason"])
        self.stats = self.stats.merge(DatasetStats.from_dict(marker["stats"]))


def _check_resumed(out: Store, plans: list[ShardPlan], totals: Totals) -> None:
    """Markers of shards already committed: each must be for exactly its plan."""
    got = read_many([out.url_of(p.name + ".json") for p in plans], out.options)
    for plan in plans:
        marker = json.loads(got[out.url_of(plan.name + ".json")])
        if marker.get("plan_digest") != plan.plan_digest:
            raise OutputConflict(f"{out.url_of(plan.name + '.json')} was committed for other inputs than this "
                                 "manifest plans; write to a new output, or delete it first")
        totals.add(marker)


def run_shard_stage(manifest: str, out: str, cfg: ShardConfig, storage_options: dict | None = None,
                    progress: bool = True) -> dict:
    """Shard a manifest into OUT and return the summary. Ray must be initialized."""
    started = time.perf_counter()
    store = Store(out, storage_options)
    source = ManifestSource.open(manifest, storage_options)
    claim_output(store, cfg, source)
    current = current_summary(store, cfg, source)
    if current is not None:
        log.info("shard: up to date (%d shards)", current["shards"])
        return current
    for folder in ("", INDEX + "/", REJECTS + "/"):  # temporaries left by a killed run
        for stale in store.names(f"{folder}*.tmp-*"):
            store.remove(stale)
    committed = {int(MARKER.fullmatch(name.removesuffix(".tar") + ".json").group(1))
                 for name in committed_shards(store)}
    totals, nodes, fresh = Totals(), Counter(), Totals()
    limit = max(8, 4 * int(ray.cluster_resources().get("CPU", 1)))
    cfg_ref = ray.put(cfg)
    in_flight: dict = {}
    resumed: list[ShardPlan] = []
    resumed_count = planned = 0
    bar = tqdm(unit="shard", disable=not progress, desc="shard")

    def collect() -> None:
        done, _ = ray.wait(list(in_flight), num_returns=1)
        in_flight.pop(done[0])
        marker, node = ray.get(done[0])
        totals.add(marker)
        fresh.add(marker)
        nodes[node] += 1
        bar.update()
        bar.set_postfix(samples_per_s=f"{fresh.written / (time.perf_counter() - started):.1f}")

    for plan in plan_shards(source, cfg, store.options):
        planned += 1
        if plan.index in committed:
            resumed.append(plan)
            if len(resumed) == RESUME_BATCH:
                _check_resumed(store, resumed, totals)
                resumed_count, resumed = resumed_count + len(resumed), []
            continue
        while len(in_flight) >= limit:
            collect()
        in_flight[_shard_task.remote(plan, cfg_ref, store)] = plan
    _check_resumed(store, resumed, totals)
    resumed_count += len(resumed)
    bar.total = planned
    bar.update(resumed_count)
    if resumed_count:
        log.info("resumed: %d of %d shards were already committed", resumed_count, planned)
    while in_flight:
        collect()
    bar.close()

    dedup = {"rejected_by_reason": {}, "duplicates": 0, "shard_groups": []}
    if totals.written:
        dedup = ray.get(_dedup_task.remote(store, cfg.dedup))
        ray.get([_mark_task.remote(store, group) for group in dedup["shard_groups"]])
    seconds = time.perf_counter() - started
    summary = {
        "inputs": totals.inputs,
        "accepted": totals.written - dedup["duplicates"],
        "rejected": totals.rejected + dedup["duplicates"],
        "rejected_by_reason": dict(sorted((totals.reasons + Counter(dedup["rejected_by_reason"])).items())),
        "duplicates": dedup["duplicates"],
        "shards": planned,
        "bytes": totals.bytes,
        "statistics": totals.stats.summary(),
        "resumed_shards": resumed_count,
        "shards_by_node": dict(nodes),
        "seconds": round(seconds, 3),
        "samples_per_s": round(fresh.written / seconds, 2),
        "config_digest": cfg.digest(),
        "manifest": {"url": source.url, "fingerprint": source.fingerprint, "files": len(source.files)},
    }
    store.write_json(SUMMARY, summary)
    log.info("%d accepted, %d rejected (%d duplicates), %d shards in %.1f s", summary["accepted"],
             summary["rejected"], dedup["duplicates"], planned, seconds)
    return summary
