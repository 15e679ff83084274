"""Driver of the training stage: read what the shards hold, then launch the workers with Ray
Train's TorchTrainer (gloo + DeepSpeed's CPU accelerator on CPUs, nccl on GPUs)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray

from preprocess.layout import OutputConflict
from preprocess.storage import absolute
from train.config import TrainConfig
from train.data import DatasetInfo
from train.loop import CHECKPOINTS, METRICS, TrainJob, ray_worker
from train.saved import RUN_CONFIG, TRAIN_SUMMARY, WEIGHTS, compatible_start

log = logging.getLogger(__name__)



def claim_run_dir(run: Path, cfg: TrainConfig, shards: str | list[str]) -> None:
    """A run folder holds one training run: resuming it with another config is refused."""
    record = {"shards": shards, "config": cfg.model_dump(mode="json")}
    path = run / RUN_CONFIG
    if path.exists():
        previous = json.loads(path.read_text())
        # how long to train may change on resume; what is trained may not
        fixed = {k: v for k, v in previous["config"].items() if k not in ("epochs", "max_steps")}
        now = {k: v for k, v in record["config"].items() if k not in ("epochs", "max_steps")}
        if fixed != now or previous["shards"] != shards:
            changed = sorted(k for k in fixed.keys() | now.keys() if fixed.get(k) != now.get(k))
            raise OutputConflict(f"{run} holds a run with another config or data (changed: "
                                 f"{', '.join(changed) or 'shards'}); use a new run folder")
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def run_train_stage(shards: str | list[str], run_dir: str, cfg: TrainConfig,
                    storage_options: dict | None = None) -> dict:
    """Train on SHARDS (one folder, or dataset versions oldest first) into RUN_DIR, resuming
    from its latest checkpoint; returns the summary."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.perf_counter()
    shards = absolute(shards) if isinstance(shards, str) else [absolute(s) for s in shards]
    run = Path(run_dir).resolve()
    claim_run_dir(run, cfg, shards)
    info = DatasetInfo.read(shards, cfg.model.modalities, cfg.val_fraction, storage_options)
    use_gpu = cfg.use_gpu if cfg.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
    resumed = (run / CHECKPOINTS / "latest").exists()
    init_state = None
    if cfg.init_from:
        init_state = compatible_start(cfg.init_from, info.dims, info.labels, cfg.model, storage_options)
    log.info("training on %d samples (%d held out), %d workers, %s, %s", info.counts["train"],
             info.counts["val"], cfg.workers, "GPU" if use_gpu else "CPU",
             f"pipeline x{cfg.pipeline_stages}" if cfg.parallel == "pipeline" else f"ZeRO-{cfg.zero_stage}")
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"job": TrainJob(cfg, info, str(run), init_state)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="ray-train", storage_path=str(run / "ray")),
    )
    trainer.fit()
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    steps = [r for r in records if r.get("loss") is not None]
    epochs = [r for r in records if "val_accuracy" in r]
    summary = {
        "train_samples": info.counts["train"], "val_samples": info.counts["val"], "labels": list(info.labels),
        "steps": steps[-1]["step"] if steps else 0, "resumed": resumed, "init_from": cfg.init_from,
        "first_loss": steps[0]["loss"] if steps else None, "final_loss": steps[-1]["loss"] if steps else None,
        "val_accuracy": epochs[-1]["val_accuracy"] if epochs else None,
        "checkpoint": (run / CHECKPOINTS / "latest").read_text().strip(),
        "model": str(run / WEIGHTS), "seconds": round(time.perf_counter() - started, 3),
    }
    (run / TRAIN_SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary
