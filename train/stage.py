"""Driver of the training stage: read what the shards hold, then launch the workers with Ray
Train's TorchTrainer (gloo + DeepSpeed's CPU accelerator on CPUs, nccl on GPUs)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import ray

from preprocess.layout import OutputConflict
from preprocess.lease import DEFAULT_LEASE, Fence, LeaseConfig, held
from preprocess.storage import Store, retries_so_far
from train.config import TrainConfig
from train.data import DatasetInfo
from train.layout import CHECKPOINTS, METRICS, RUN_CONFIG, SUPERSEDED, WEIGHTS, TrainSummary, run_record
from train.loop import TrainJob, ray_worker
from train.run_store import Checkpoints, scratch_for
from train.saved import compatible_start, teacher_for

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = ("epochs", "max_steps", "max_failures")


def claim_run(run: Store, cfg: TrainConfig, shards: Store | Sequence[Store]) -> None:
    """A run folder holds one training run: resuming it with another config is refused."""
    record = run_record(cfg, shards)
    if run.exists(RUN_CONFIG):
        previous = run.read_json(RUN_CONFIG)
        # how long to train (and how often to retry) may change on resume; what is trained may not
        fixed = {k: v for k, v in previous["config"].items() if k not in RESUMABLE_CHANGES}
        now = {k: v for k, v in record["config"].items() if k not in RESUMABLE_CHANGES}
        if fixed != now or previous["shards"] != record["shards"]:
            changed = sorted(k for k in fixed.keys() | now.keys() if fixed.get(k) != now.get(k))
            raise OutputConflict(f"{run.url} holds a run with another config or data (changed: "
                                 f"{', '.join(changed) or 'shards'}); use a new run folder")
    run.write_json(RUN_CONFIG, record)


def run_train_stage(shards: Store | Sequence[Store], run: Store, cfg: TrainConfig,
                    lease: LeaseConfig | Fence = DEFAULT_LEASE) -> TrainSummary:
    """Train on SHARDS (one folder, or dataset versions oldest first) into the RUN folder,
    holding its lease, resuming from its latest checkpoint; returns the summary. Workers write
    everything through the stores, so the nodes need no shared disk."""
    with held(run, lease, "tessera train") as fence:
        return _train(shards, run, cfg, fence)


def _train(shards: Store | Sequence[Store], run: Store, cfg: TrainConfig, fence: Fence) -> TrainSummary:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started, retries_before = time.perf_counter(), retries_so_far()
    info = DatasetInfo.read(shards, cfg.model.modalities, cfg.val_fraction, cfg.tasks, run.child(SUPERSEDED))
    checkpoints = run.at(cfg.checkpoint_url) if cfg.checkpoint_url else run.child(CHECKPOINTS)
    claim_run(run, cfg, shards)
    use_gpu = cfg.use_gpu if cfg.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
    resumed = Checkpoints(checkpoints).latest() is not None
    job = TrainJob(cfg, info, run, checkpoints, fence,
                   init_state=compatible_start(run.at(cfg.init_from), info.dims, info.tasks, cfg.model)
                   if cfg.init_from else None,
                   teacher=teacher_for(run.at(cfg.distill_from), info.dims, info.tasks, cfg.model)
                   if cfg.distill_from else None)
    log.info("training on %d samples (%d held out), %d workers, %s, %s", info.counts["train"],
             info.counts["val"], cfg.workers, "GPU" if use_gpu else "CPU",
             f"pipeline x{cfg.pipeline_stages}" if cfg.parallel == "pipeline" else f"ZeRO-{cfg.zero_stage}")
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # Ray Train's own records stay on the driver's disk; a failed worker group (a node
        # lost) is restarted, and resumes from the store's latest checkpoint
        run_config=RunConfig(name="ray-train", storage_path=str(scratch_for(run.url) / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    trainer.fit()
    records = [json.loads(line) for line in run.read_bytes(METRICS).decode().splitlines()]
    steps = [r for r in records if r.get("loss") is not None]
    epochs = [r for r in records if "val_tasks" in r]
    summary = TrainSummary(
        train_samples=info.counts["train"], val_samples=info.counts["val"], tasks=[t.name for t in info.tasks],
        steps=steps[-1]["step"] if steps else 0, resumed=resumed,
        first_loss=steps[0]["loss"] if steps else None, final_loss=steps[-1]["loss"] if steps else None,
        val_accuracy=epochs[-1]["val_accuracy"] if epochs else None,
        val_tasks=epochs[-1]["val_tasks"] if epochs else None,
        checkpoint=Checkpoints(checkpoints).latest(), model=run.url_of(WEIGHTS),
        init_from=cfg.init_from, distilled_from=cfg.distill_from, seconds=round(time.perf_counter() - started, 3),
        # the last worker group's (rank 0 records them last) and the driver's
        store_retries=next((r["store_retries"] for r in reversed(records) if "store_retries" in r), 0)
        + retries_so_far() - retries_before,
    )
    fence.check(TrainSummary.FILE)
    summary.write(run)
    return summary
