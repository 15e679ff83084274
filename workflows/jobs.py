"""The jobs users run: the whole chain shard -> embed -> train in one Ray job, each stage
skipped (and saying so) when its outputs are up to date for its inputs and config."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from importlib import resources

from features.stage import EMBED_SUMMARY, run_embed_stage
from preprocess.layout import SUMMARY
from preprocess.stage import run_shard_stage
from preprocess.storage import Store, absolute, filesystem, join, write_json
from train.evaluate import EVAL, evaluate_run
from train.saved import RUN_CONFIG, TRAIN_SUMMARY
from train.stage import run_train_stage
from workflows.config import ConfigError, TesseraConfig
from workflows.report import write_report

log = logging.getLogger(__name__)


def bundled_manifest() -> str:
    return str(resources.files("workflows") / "sample_corpus" / "manifest.jsonl")


def data_digest(shards: str, storage_options: dict) -> str:
    """What training depends on: the samples (the shard config and the manifest they came
    from) and the encoders of their embeddings."""
    store = Store(shards, storage_options)
    summary = store.read_json(SUMMARY)
    encoders = store.read_json(EMBED_SUMMARY)["encoders"]
    return hashlib.sha256(json.dumps([summary["config_digest"], summary["manifest"]["fingerprint"], encoders],
                                     sort_keys=True).encode()).hexdigest()


def _train_is_current(run: Store, cfg: TesseraConfig, shards: str | list[str]) -> bool:
    if not all(run.exists(name) for name in (TRAIN_SUMMARY, RUN_CONFIG, EVAL)):
        return False  # (a run stopped before its evaluation is finished by the next one)
    return run.read_json(RUN_CONFIG) == {"shards": shards, "config": cfg.train.model_dump(mode="json")}


def train_into(cfg: TesseraConfig, out: str, run_path: str, shards: str | list[str]) -> tuple[dict, bool, str]:
    """Train SHARDS into OUT/RUN_PATH, then evaluate it (eval.json), unless that run is already
    done for this data and config: (summary, up to date, the run's URL). Every file of the run
    goes through the store, so OUT may be an object store the nodes share instead of a disk."""
    run = Store(out, cfg.runtime.storage_options).child(run_path)
    if _train_is_current(run, cfg, shards):
        log.info("train: up to date (%s)", run.url)
        return run.read_json(TRAIN_SUMMARY), True, run.url
    summary = run_train_stage(shards, run.url, cfg.train, cfg.runtime.storage_options)
    evaluate_run(run.url, storage_options=cfg.runtime.storage_options)
    return summary, False, run.url


def run_pipeline(cfg: TesseraConfig) -> dict:
    """Shard, embed and train; returns {stage: summary, ...} and writes OUT/run-summary.json."""
    if not cfg.job.manifest or not cfg.job.out:
        raise ConfigError("tessera run needs job.manifest and job.out in the config (or --dry-run)")
    started = time.perf_counter()
    options, progress = cfg.runtime.storage_options, cfg.runtime.progress
    out = absolute(cfg.job.out)
    shards = join(out, "shards")
    report: dict = {"stages": {}}

    shard = run_shard_stage(cfg.job.manifest, shards, cfg.shard, options, progress)
    fresh = shard["shards"] - shard["resumed_shards"]
    report["stages"]["shard"] = {"up_to_date": fresh == 0, **shard}
    log.info("shard: %s", "up to date" if fresh == 0 else f"{fresh} shards written")

    embed = run_embed_stage(shards, cfg.embed, options, progress)
    current = embed["computed"] == 0 and embed["sidecars_written"] == 0
    report["stages"]["embed"] = {"up_to_date": current, **embed}
    log.info("embed: %s", "up to date" if current else f"{embed['computed']} embeddings computed")

    # one training run per data version; the same data and config again is up to date
    train, current, run = train_into(cfg, out, join("train", data_digest(shards, options)[:12]), shards)
    report["stages"]["train"] = {"up_to_date": current, **train}
    report["seconds"] = round(time.perf_counter() - started, 3)
    fs, root = filesystem(out, options)
    write_json(fs, join(root, "run-summary.json"), report)
    report["report"] = write_report(out, options, run)
    return report
