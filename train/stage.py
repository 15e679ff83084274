"""Driver of the training stage: read what the shards hold, then launch the workers with Ray
Train's TorchTrainer (gloo + DeepSpeed's CPU accelerator on CPUs, nccl on GPUs)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import ray

from preprocess.layout import OutputConflict
from preprocess.storage import Store, absolute
from train.config import TrainConfig
from train.data import DatasetInfo
from train.loop import TrainJob, ray_worker
from train.run_store import METRICS, Checkpoints, scratch_for
from train.saved import RUN_CONFIG, TRAIN_SUMMARY, WEIGHTS, compatible_start, teacher_for

log = logging.getLogger(__name__)



RESUMABLE_CHANGES = ("epochs", "max_steps", "max_failures")


def claim_run(run: Store, cfg: TrainConfig, shards: str | list[str]) -> None:
    """A run folder holds one training run: resuming it with another config is refused."""
    record = {"shards": shards, "config": cfg.model_dump(mode="json")}
    if run.exists(RUN_CONFIG):
        previous = run.read_json(RUN_CONFIG)
        # how long to train (and how often to retry) may change on resume; what is trained may not
        fixed = {k: v for k, v in previous["config"].items() if k not in RESUMABLE_CHANGES}
        now = {k: v for k, v in record["config"].items() if k not in RESUMABLE_CHANGES}
        if fixed != now or previous["shards"] != shards:
            changed = sorted(k for k in fixed.keys() | now.keys() if fixed.get(k) != now.get(k))
            raise OutputConflict(f"{run.url} holds a run with another config or data (changed: "
                                 f"{', '.join(changed) or 'shards'}); use a new run folder")
    run.write_json(RUN_CONFIG, record)


def run_train_stage(shards: str | list[str], run_url: str, cfg: TrainConfig,
                    storage_options: dict | None = None) -> dict:
    """Train on SHARDS (one folder, or dataset versions oldest first) into RUN_URL (any fsspec
    URL), resuming from its latest checkpoint; returns the summary. Workers write everything
    through the store, so the nodes need no shared disk."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.perf_counter()
    shards = absolute(shards) if isinstance(shards, str) else [absolute(s) for s in shards]
    info = DatasetInfo.read(shards, cfg.model.modalities, cfg.val_fraction, storage_options, cfg.tasks)
    job = TrainJob(cfg, info, absolute(run_url))
    run, checkpoint_store = job.stores()
    claim_run(run, cfg, shards)
    use_gpu = cfg.use_gpu if cfg.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
    resumed = Checkpoints(checkpoint_store).latest() is not None
    if cfg.init_from:
        job = dataclasses.replace(job, init_state=compatible_start(cfg.init_from, info.dims, info.tasks, cfg.model,
                                                                   storage_options))
    if cfg.distill_from:
        job = dataclasses.replace(job, teacher=teacher_for(cfg.distill_from, info.dims, info.tasks, cfg.model,
                                                           storage_options))
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
        run_config=RunConfig(name="ray-train", storage_path=str(scratch_for(job.run) / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    trainer.fit()
    records = [json.loads(line) for line in run.read_bytes(METRICS).decode().splitlines()]
    steps = [r for r in records if r.get("loss") is not None]
    epochs = [r for r in records if "val_tasks" in r]
    summary = {
        "train_samples": info.counts["train"], "val_samples": info.counts["val"], "tasks": [t.name for t in info.tasks],
        "steps": steps[-1]["step"] if steps else 0, "resumed": resumed, "init_from": cfg.init_from,
        "first_loss": steps[0]["loss"] if steps else None, "final_loss": steps[-1]["loss"] if steps else None,
        "val_accuracy": epochs[-1]["val_accuracy"] if epochs else None,
        "val_tasks": epochs[-1]["val_tasks"] if epochs else None, "distilled_from": cfg.distill_from,
        "checkpoint": Checkpoints(checkpoint_store).latest(),
        "model": run.url_of(WEIGHTS), "seconds": round(time.perf_counter() - started, 3),
    }
    run.write_json(TRAIN_SUMMARY, summary)
    return summary
