"""The jobs users run, and the chain they share: shard -> embed -> curate -> train (then
evaluate), each stage through the engine (core/engine.py) and skipped, saying so, when its
outputs are up to date for its inputs and config. `tessera run` runs the chain once into
OUT; `tessera refresh` runs it on each new dataset version (workflows/refresh.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

from tessera.core.engine import execute
from tessera.core.errors import ConfigError
from tessera.core.lease import Fence, held
from tessera.core.storage import Store
from tessera.features.curate import CurateStage
from tessera.features.layout import CurateSummary, EmbedSummary
from tessera.features.stage import EmbedStage
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.layout import ShardSummary
from tessera.preprocess.stage import ShardStage
from tessera.train.evaluate import EvalStage
from tessera.train.layout import EVAL, TrainSummary
from tessera.train.stage import TrainStage
from tessera.train.tracking import numbers, record_results
from tessera.workflows.config import TesseraConfig
from tessera.workflows.layout import RUN_SUMMARY, SHARDS, TRAIN
from tessera.workflows.report import write_report

log = logging.getLogger(__name__)


def bundled_manifest() -> str:
    """The bundled sample corpus's everyday samples (image, text, audio, video)."""
    return str(resources.files("tessera.workflows") / "sample_corpus" / "manifest.jsonl")


def bundled_corpus() -> str:
    """The whole bundled sample corpus, the dry run's input: its manifests (a glob), the everyday
    samples and the medical ones (DICOM)."""
    return str(resources.files("tessera.workflows") / "sample_corpus" / "*.jsonl")


@dataclass(frozen=True)
class ChainResult:
    """What each stage of the chain did (curate and train: None when the job has them off)."""

    shard: ShardSummary
    embed: EmbedSummary
    curate: CurateSummary | None = None
    train: TrainSummary | None = None

    def stages(self) -> dict[str, dict]:
        """The summaries that ran, as their JSON records, in chain order."""
        return {name: summary.to_json() for name in ("shard", "embed", "curate", "train")
                if (summary := getattr(self, name)) is not None}


# where a chain trains, once the shards are known: (run folder, the shard folders it trains on,
# the config) or None (no training)
TrainTarget = Callable[[Store, ShardSummary], tuple[Store, Sequence[Store], TesseraConfig] | None]


def run_chain(cfg: TesseraConfig, manifest: str, shards: Store, train: TrainTarget, *,
              shard_cfg: ShardConfig | None = None, cache: Store | None = None,
              earlier: Sequence[Store] = ()) -> ChainResult:
    """Shard MANIFEST into SHARDS (with SHARD_CFG, default cfg.shard; deduped against the live rows
    of EARLIER dataset versions), embed it (vectors cached in CACHE, default per embed.cache),
    curate it when cfg.curate says so (against EARLIER too), then train and evaluate where TRAIN
    says. Each stage holds its own folder's lease; Ray must be up."""
    progress, lease = cfg.runtime.progress, cfg.runtime.lease
    shard = execute(ShardStage(manifest, shards, shard_cfg or cfg.shard, earlier), lease, progress)
    log.info("shard: %s", "up to date" if shard.up_to_date else f"{shard.shards - shard.resumed_shards} shards written")
    embed = execute(EmbedStage(shards, cfg.embed, cache), lease, progress)
    log.info("embed: %s", "up to date" if embed.up_to_date else f"{embed.computed} vectors computed")
    curate = execute(CurateStage(shards, cfg.curate, earlier), lease, progress) if cfg.curate.enabled else None
    target = train(shards, shard)
    trained = train_into(target[2], target[0], target[1]) if target else None
    return ChainResult(shard, embed, curate, trained)


def data_digest(shards: Store) -> str:
    """What training depends on: the samples (the shard config and the manifest they came
    from), the encoders of their embeddings, and the curation that dropped some of them."""
    summary = ShardSummary.read(shards)
    encoders = EmbedSummary.read(shards).encoders
    curation = CurateSummary.read(shards).digest if CurateSummary.exists(shards) else None
    record = [summary.config_digest, summary.manifest["fingerprint"], encoders] + ([curation] if curation else [])
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def run_folder(out: Store, shards: Store) -> Store:
    """Where `tessera run` trains SHARDS: one run per data version (the same data and config
    again is up to date)."""
    return out.child(TRAIN, data_digest(shards)[:12])


def train_into(cfg: TesseraConfig, run: Store, shards: Store | Sequence[Store]) -> TrainSummary:
    """Train SHARDS into the RUN folder, then evaluate it (eval.json), unless that run is
    already done for this data and config (then its summary says up_to_date). Every file of
    the run goes through the store, so it may be on an object store the nodes share."""
    stage = TrainStage(shards, run, cfg.train, cfg.tracking)
    current = stage.current()
    if current is not None and run.exists(EVAL):  # (a run stopped before its evaluation is finished now)
        log.info("train: up to date (%s)", run.url)
        return current.replace(up_to_date=True)
    summary = execute(stage, cfg.runtime.lease, progress=False)
    evaluated = execute(EvalStage(run), cfg.runtime.lease, progress=False)
    record_results(cfg.tracking, run, numbers(evaluated.sets, "eval"), {EVAL: run.read_bytes(EVAL)})
    return summary


def run_pipeline(cfg: TesseraConfig, out: Store, lease: Fence | None = None) -> dict:
    """Shard, embed (curate) and train into OUT (the store of job.out), holding its lease (LEASE,
    when the caller holds it already); returns {stage: summary, ...} as JSON and writes
    OUT/run-summary.json."""
    if not cfg.job.manifest:
        raise ConfigError("tessera run needs job.manifest and job.out in the config (or --dry-run)")
    with held(out, lease or cfg.runtime.lease, "tessera run") as fence:
        started = time.perf_counter()
        shards = out.child(SHARDS)
        chain = run_chain(cfg, cfg.job.manifest, shards, lambda folder, _: (run_folder(out, folder), folder, cfg))
        report = {"stages": chain.stages(), "seconds": round(time.perf_counter() - started, 3)}
        fence.check(RUN_SUMMARY)
        out.write_json(RUN_SUMMARY, report)
        report["report"] = write_report(out, run_folder(out, shards))
    return report
