"""The jobs users run: the whole chain shard -> embed -> train in one Ray job, each stage
skipped (and saying so) when its outputs are up to date for its inputs and config."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from importlib import resources

from features.curate import run_curate_stage
from features.layout import CurateSummary, EmbedSummary
from features.stage import run_embed_stage
from preprocess.layout import ShardSummary
from preprocess.lease import Fence, held
from preprocess.stage import run_shard_stage
from preprocess.storage import Store
from train.evaluate import evaluate_run
from train.layout import EVAL, RUN_CONFIG, TrainSummary, run_record
from train.stage import run_train_stage
from workflows.config import ConfigError, TesseraConfig
from workflows.layout import RUN_SUMMARY, SHARDS, TRAIN
from workflows.report import write_report

log = logging.getLogger(__name__)


def bundled_manifest() -> str:
    return str(resources.files("workflows") / "sample_corpus" / "manifest.jsonl")


def data_digest(shards: Store) -> str:
    """What training depends on: the samples (the shard config and the manifest they came
    from), the encoders of their embeddings, and the curation that dropped some of them."""
    summary = ShardSummary.read(shards)
    encoders = EmbedSummary.read(shards).encoders
    curation = CurateSummary.read(shards).digest if CurateSummary.exists(shards) else None
    record = [summary.config_digest, summary.manifest["fingerprint"], encoders] + ([curation] if curation else [])
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _train_is_current(run: Store, cfg: TesseraConfig, shards: Store | Sequence[Store]) -> bool:
    if not all(run.exists(name) for name in (TrainSummary.FILE, RUN_CONFIG, EVAL)):
        return False  # (a run stopped before its evaluation is finished by the next one)
    return run.read_json(RUN_CONFIG) == run_record(cfg.train, shards)


def train_into(cfg: TesseraConfig, run: Store, shards: Store | Sequence[Store]) -> TrainSummary:
    """Train SHARDS into the RUN folder, then evaluate it (eval.json), unless that run is
    already done for this data and config (then its summary says up_to_date). Every file of
    the run goes through the store, so it may be on an object store the nodes share."""
    if _train_is_current(run, cfg, shards):
        log.info("train: up to date (%s)", run.url)
        return TrainSummary.read(run).replace(up_to_date=True)
    summary = run_train_stage(shards, run, cfg.train, cfg.runtime.lease)
    evaluate_run(run, lease=cfg.runtime.lease)
    return summary


def run_pipeline(cfg: TesseraConfig, out: Store, lease: Fence | None = None) -> dict:
    """Shard, embed and train into OUT (the store of job.out), holding its lease (LEASE, when
    the caller holds it already); returns {stage: summary, ...} as JSON and writes
    OUT/run-summary.json."""
    if not cfg.job.manifest:
        raise ConfigError("tessera run needs job.manifest and job.out in the config (or --dry-run)")
    with held(out, lease or cfg.runtime.lease, "tessera run") as fence:
        return _run(cfg, out, fence)


def _run(cfg: TesseraConfig, out: Store, fence: Fence) -> dict:
    started, progress, lease = time.perf_counter(), cfg.runtime.progress, cfg.runtime.lease
    shards = out.child(SHARDS)
    report: dict = {"stages": {}}

    shard = run_shard_stage(cfg.job.manifest, shards, cfg.shard, progress, lease)
    report["stages"]["shard"] = shard.to_json()
    log.info("shard: %s", "up to date" if shard.up_to_date else f"{shard.shards - shard.resumed_shards} shards written")

    embed = run_embed_stage(shards, cfg.embed, progress=progress, lease=lease)
    report["stages"]["embed"] = embed.to_json()
    log.info("embed: %s", "up to date" if embed.up_to_date else f"{embed.computed} embeddings computed")

    if cfg.curate.enabled:
        curate = run_curate_stage(shards, cfg.curate, progress, lease)
        report["stages"]["curate"] = curate.to_json()

    # one training run per data version; the same data and config again is up to date
    run = out.child(TRAIN, data_digest(shards)[:12])
    report["stages"]["train"] = train_into(cfg, run, shards).to_json()
    report["seconds"] = round(time.perf_counter() - started, 3)
    fence.check(RUN_SUMMARY)
    out.write_json(RUN_SUMMARY, report)
    report["report"] = write_report(out, run)
    return report
