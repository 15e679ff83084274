"""The training stage (`TrainStage`, run by core/engine.py): read what the shards hold, then
launch the workers with Ray Train's TorchTrainer (gloo + DeepSpeed's CPU accelerator on CPUs,
nccl on GPUs) — or, for a tune trial of one worker, train that one rank in the trial's own
(reused) actor."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import ray
import torch

from tessera.core.engine import Stage, StageRun, execute
from tessera.core.errors import OutputConflict, StoppedOnRequest
from tessera.core.lease import DEFAULT_LEASE, Fence, LeaseConfig
from tessera.core.storage import Store
from tessera.train.config import NO_TRACKING, TrackingConfig, TrainConfig
from tessera.train.crossval import cross_validate
from tessera.train.data import DatasetInfo
from tessera.train.layout import (
    CHECKPOINTS,
    METRICS,
    RUN_CONFIG,
    STOP_REQUESTED,
    SUPERSEDED,
    TRAIN_SUMMARY,
    WEIGHTS,
    TrainSummary,
    run_record,
)
from tessera.train.loop import TrainJob, in_process_worker, ray_worker
from tessera.train.run_store import Checkpoints, scratch_for
from tessera.train.saved import compatible_start, teacher_for
from tessera.train.tracking import record_training

log = logging.getLogger(__name__)

# how long to train, how often to retry, and on how many workers (a checkpoint saved by another
# number of ranks is loaded in DeepSpeed's universal form) may change on resume
RESUMABLE_CHANGES = ("epochs", "max_steps", "max_failures", "workers", "cpus_per_worker")


def claim_run(run: Store, cfg: TrainConfig, shards: Store | Sequence[Store]) -> None:
    """A run folder holds one training run: resuming it with another config is refused."""
    record = run_record(cfg, shards)
    if run.exists(RUN_CONFIG):
        previous = run.read_json(RUN_CONFIG)
        # what is trained may not change
        fixed = {k: v for k, v in previous["config"].items() if k not in RESUMABLE_CHANGES}
        now = {k: v for k, v in record["config"].items() if k not in RESUMABLE_CHANGES}
        if fixed != now or previous["shards"] != record["shards"]:
            changed = sorted(k for k in fixed.keys() | now.keys() if fixed.get(k) != now.get(k))
            raise OutputConflict(f"{run.url} holds a run with another config or data (changed: "
                                 f"{', '.join(changed) or 'shards'}); use a new run folder")
        if cfg.parallel == "pipeline" and previous["config"]["workers"] != cfg.workers:
            raise OutputConflict(f"{run.url} holds a pipeline run of {previous['config']['workers']} workers: it "
                                 f"resumes on as many (not {cfg.workers}); use a new run folder")
    run.write_json(RUN_CONFIG, record)
    if run.exists(TRAIN_SUMMARY):  # (an earlier config's: the run is being trained on)
        run.remove(TRAIN_SUMMARY)


class TrainStage(Stage[TrainSummary]):
    """Training on SHARDS (one folder, or dataset versions oldest first) into the RUN folder,
    resuming from its latest checkpoint. Workers write everything through the stores, so the
    nodes need no shared disk."""

    command = "tessera train"

    def __init__(self, shards: Store | Sequence[Store], run: Store, cfg: TrainConfig,
                 tracking: TrackingConfig = NO_TRACKING, tags: dict[str, str] | None = None, in_process: bool = False):
        if in_process and (cfg.workers != 1 or cfg.cross_validation.folds):
            raise ValueError("a training in this process has one worker and no folds")
        self.shards, self.folder, self.cfg = shards, run, cfg
        self.tracking, self.tags = tracking, tags or {}
        self.in_process = in_process  # the one rank here (loop.in_process_worker), not on Ray Train

    def current(self) -> TrainSummary | None:
        """The run's summary when it finished training with this config on these shards."""
        folder = self.folder
        if not (folder.exists(TRAIN_SUMMARY) and folder.exists(RUN_CONFIG)):
            return None
        if folder.read_json(RUN_CONFIG) != run_record(self.cfg, self.shards):
            return None
        return TrainSummary.read(folder)

    def run(self, run: StageRun) -> TrainSummary:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        shards, folder, cfg = self.shards, self.folder, self.cfg
        if cfg.cross_validation.folds and cfg.cross_validation.fold is None:  # (each fold reads its inputs)
            claim_run(folder, cfg, shards)
            return cross_validate(shards, folder, cfg, self.tracking, self.tags)
        info = DatasetInfo.read(shards, cfg.model.modalities, cfg.val_split, cfg.tasks, folder.child(SUPERSEDED))
        checkpoints = folder.at(cfg.checkpoint_url) if cfg.checkpoint_url else folder.child(CHECKPOINTS)
        claim_run(folder, cfg, shards)
        if folder.exists(STOP_REQUESTED):  # (asked of an earlier run of the folder)
            folder.remove(STOP_REQUESTED)
        use_gpu = torch.cuda.is_available() if self.in_process else \
            cfg.use_gpu if cfg.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
        resumed = Checkpoints(checkpoints).latest() is not None
        job = TrainJob(cfg, info, folder, checkpoints, run.fence,
                       init_state=compatible_start(folder.at(cfg.init_from), info.dims, info.tasks, cfg.model)
                       if cfg.init_from else None,
                       teacher=teacher_for(folder.at(cfg.distill_from), info.dims, info.tasks, cfg.model)
                       if cfg.distill_from else None)
        log.info("training on %d samples (%d held out), %d workers, %s, %s", info.counts["train"],
                 info.counts["val"], cfg.workers, "GPU" if use_gpu else "CPU",
                 f"pipeline x{cfg.pipeline_stages}" if cfg.parallel == "pipeline" else f"ZeRO-{cfg.zero_stage}")
        trainer = partial(
            TorchTrainer, ray_worker,
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            # Ray Train's own records stay on the driver's disk; a failed worker group (a node
            # lost) is restarted, and resumes from the store's latest checkpoint
            run_config=RunConfig(name="ray-train", storage_path=str(scratch_for(folder.url) / "ray"),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures)),
        )
        tags = self.tags | {"tessera.shards": json.dumps(run_record(cfg, shards)["shards"])}
        try:
            if self.in_process:
                in_process_worker(job)  # (a failure fails the caller: a tune trial, which Tune starts again)
            else:
                _fit(trainer, cfg.max_failures)
        except BaseException:
            record_training(self.tracking, folder, cfg.model_dump(mode="json"), tags, "FAILED")
            raise
        records = [json.loads(line) for line in folder.read_bytes(METRICS).decode().splitlines()]
        stopped = bool(records) and records[-1].get("stopped", False)
        record_training(self.tracking, folder, cfg.model_dump(mode="json"), tags, "KILLED" if stopped else "FINISHED")
        if stopped:
            raise StoppedOnRequest(f"{folder.url}: stopped on request at step {records[-1]['step']} "
                                   "(checkpointed; the same command resumes it)")
        steps = [r for r in records if r.get("loss") is not None]
        epochs = [r for r in records if "val_tasks" in r]
        # the ranks' retries (the last worker group's: rank 0 records them last); the engine adds the driver's
        run.work.task_retries += next((r["store_retries"] for r in reversed(records) if "store_retries" in r), 0)
        return TrainSummary(
            train_samples=info.counts["train"], val_samples=info.counts["val"], tasks=[t.name for t in info.tasks],
            steps=steps[-1]["step"] if steps else 0, resumed=resumed,
            first_loss=steps[0]["loss"] if steps else None, final_loss=steps[-1]["loss"] if steps else None,
            val_accuracy=epochs[-1]["val_accuracy"] if epochs else None,
            val_tasks=epochs[-1]["val_tasks"] if epochs else None,
            checkpoint=Checkpoints(checkpoints).latest(), model=folder.url_of(WEIGHTS),
            init_from=cfg.init_from, distilled_from=cfg.distill_from,
            pipeline_stages=next((r["pipeline_stages"] for r in records if "pipeline_stages" in r), None))


def _fit(trainer: Callable[[], Any], max_failures: int) -> None:
    for attempt in itertools.count(1):
        try:
            trainer().fit()
            return
        except ray.exceptions.RayActorError as lost:
            # Ray Train's controller itself died (its process killed; Ray's restarts cover the
            # workers, not it): a new one resumes from the latest checkpoint
            if attempt > max_failures:
                raise
            log.warning("the training's controller was lost (%s): starting it again", str(lost).splitlines()[0])


def run_train_stage(shards: Store | Sequence[Store], run: Store, cfg: TrainConfig,
                    lease: LeaseConfig | Fence = DEFAULT_LEASE, tracking: TrackingConfig = NO_TRACKING,
                    tags: dict[str, str] | None = None, in_process: bool = False) -> TrainSummary:
    """TrainStage through the engine, holding RUN's lease (or under LEASE, the fence of a caller
    that holds it); Ray must be initialized. Returns the summary."""
    return execute(TrainStage(shards, run, cfg, tracking, tags, in_process), lease, progress=False)
