"""The program every training worker runs: plain arguments in (rank and world passed
explicitly), so it runs under Ray Train or any other launcher that set up torch.distributed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from preprocess.storage import filesystem, join, write_atomic
from train.config import TrainConfig
from train.data import DatasetInfo, StreamSpec, loader
from train.model import MultimodalModel
from train.parallel import build_engine, resolve_precision
from train.saved import META, WEIGHTS

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class TrainJob:
    cfg: TrainConfig
    info: DatasetInfo
    run_dir: str  # a folder every worker can write (local disk or a shared filesystem)
    init_state: dict | None = None  # starting weights (cfg.init_from), checked on the driver


class CheckpointMirror:
    """Copies of the local DeepSpeed checkpoints on any fsspec store, `latest` written last."""

    def __init__(self, url: str, storage_options: dict, local: Path):
        self.fs, self.root = filesystem(url, storage_options)
        self.local = local

    def push(self, tag: str) -> None:
        """Upload the tag's files this node holds (each node's first rank calls it)."""
        for path in sorted(p for p in (self.local / tag).rglob("*") if p.is_file()):
            self.fs.put_file(str(path), join(self.root, tag, str(path.relative_to(self.local / tag))))

    def commit(self, tag: str, keep: int) -> None:
        write_atomic(self.fs, join(self.root, "latest"), tag.encode())
        tags = sorted(p.rsplit("/", 1)[-1] for p in self.fs.glob(join(self.root, "step-*")))
        for old in tags[:-keep]:
            self.fs.rm(join(self.root, old), recursive=True)

    def pull_latest(self) -> None:
        """Bring the store's latest checkpoint here when this node does not have it."""
        latest = join(self.root, "latest")
        if not self.fs.exists(latest):
            return
        tag = self.fs.cat_file(latest).decode().strip()
        local_latest = self.local / "latest"
        if local_latest.exists() and local_latest.read_text().strip() == tag:
            return
        self.fs.get(join(self.root, tag) + "/", str(self.local / tag) + "/", recursive=True)
        self.local.mkdir(parents=True, exist_ok=True)
        local_latest.write_text(tag)


def _inputs(batch: dict, device) -> tuple:
    inputs = [batch["features"].to(device), batch["mask"].to(device)]
    if "pixels" in batch:
        inputs.append(batch["pixels"].to(device))
    return tuple(inputs)


class TimedBatches:
    """The loader's batches, counting the time this process waited for them and the time the
    loader processes spent making them (what shows whether the input keeps up with training)."""

    def __init__(self, batches):
        self.batches = iter(batches)
        self.waited = self.made = 0.0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        started = time.perf_counter()
        batch = next(self.batches)
        self.waited += time.perf_counter() - started
        self.made += batch.pop("made_seconds", 0.0)
        return batch


def _pipeline_items(batches, device):
    for batch in batches:
        yield _inputs(batch, device), (batch["labels"].to(device), batch["weights"].to(device))


def _sum_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _seed_step(cfg: TrainConfig, step: int, rank: int) -> None:
    # dropout draws depend on (seed, step, rank) only, so a resumed run repeats them exactly
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)


def _validate(engine, spec: StreamSpec, epoch: int, pipeline: bool, device) -> dict:
    loss_sum = correct = count = 0.0
    engine.eval()
    with torch.no_grad():
        if pipeline:
            items = _pipeline_items(loader(spec, epoch), device)
            for _ in range(spec.batches_per_rank // engine.micro_batches):
                micro = [next(items) for _ in range(engine.micro_batches)]
                loss, logits = engine.eval_batch(iter(micro), return_logits=True)
                if engine.is_last_stage():
                    labels = torch.cat([m[1][0] for m in micro])
                    weights = torch.cat([m[1][1] for m in micro])
                    correct += float(((logits.argmax(-1) == labels).float() * weights).sum())
                    count += float(weights.sum())
                    loss_sum += float(loss) * float(weights.sum())
        else:
            for batch in loader(spec, epoch):
                loss, logits = engine(_inputs(batch, device), batch["labels"].to(device), batch["weights"].to(device))
                weights = batch["weights"].to(device)
                correct += float(((logits.argmax(-1) == batch["labels"].to(device)).float() * weights).sum())
                count += float(weights.sum())
                loss_sum += float(loss) * float(weights.sum())
    engine.train()
    loss_sum, correct, count = _sum_over_ranks([loss_sum, correct, count], device)
    return {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(count, 1), "val_samples": count}


def _save(engine, ckpt_dir: Path, step: int, epoch: int, batch: int, keep: int,
          mirror: CheckpointMirror | None = None, local_rank: int = 0) -> None:
    """Save a tag, then point `latest` at it only once every rank has written its part.

    (DeepSpeed's own `latest` is written by rank 0 without waiting for the others' ZeRO
    files, so a rank dying mid-save could leave `latest` on an incomplete checkpoint.)"""
    tag = f"step-{step:07d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "epoch": epoch, "batch": batch},
                           save_latest=False)
    dist.barrier()
    if mirror is not None:
        if local_rank == 0:
            mirror.push(tag)
        dist.barrier()
    if dist.get_rank() == 0:
        tmp = ckpt_dir / f"latest.tmp-{os.getpid()}"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        tags = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        if mirror is not None:
            mirror.commit(tag, keep)
    dist.barrier()


def _export(engine, model: MultimodalModel, job: TrainJob, ckpt_dir: Path, tag: str, pipeline: bool) -> None:
    """Consolidated fp32 weights (safetensors) + what is needed to rebuild the model."""
    from safetensors.torch import save_file

    cfg = job.cfg
    if pipeline:
        for i, layer in enumerate(model.layers()):
            path = ckpt_dir / tag / f"layer_{i:02d}-model_states.pt"
            layer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        state = model.state_dict()
    elif cfg.zero_stage == 0:
        state = engine.module.state_dict()
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    run = Path(job.run_dir)
    save_file(state, str(run / WEIGHTS), metadata={"format": "pt"})
    (run / META).write_text(json.dumps({
        "dims": job.info.dims, "labels": list(job.info.labels), "model": cfg.model.model_dump(mode="json"),
        "pixel_mean": job.info.pixel_mean, "pixel_std": job.info.pixel_std, "checkpoint": tag,
    }, indent=1))


def run_worker(job: TrainJob, rank: int, world: int, local_rank: int | None = None) -> dict:
    cfg, info = job.cfg, job.info
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = MultimodalModel(info.dims, len(info.labels), cfg.model)
    if job.init_state is not None:
        model.load_state_dict(job.init_state)
    data_world = world // cfg.pipeline_stages if cfg.parallel == "pipeline" else world

    def spec(split: str, data_rank: int) -> StreamSpec:
        return StreamSpec(info, split, cfg.val_fraction, cfg.micro_batch_size, cfg.shuffle_buffer, cfg.seed,
                          cfg.model.image_branch_size if cfg.model.image_branch else None, data_rank, data_world,
                          max(1, cfg.loader_workers), cfg.grad_accum)

    steps_per_epoch = spec("train", 0).batches_per_rank // cfg.grad_accum
    total_steps = min(cfg.max_steps or 1 << 62, cfg.epochs * steps_per_epoch)
    engine, data_rank, _, pipeline = build_engine(model, cfg, world, total_steps,
                                                  resolve_precision(cfg, on_gpu))
    train_spec, val_spec = spec("train", data_rank), spec("val", data_rank)
    run = Path(job.run_dir)
    ckpt_dir = run / CHECKPOINTS
    local_rank = rank if local_rank is None else local_rank
    mirror = CheckpointMirror(cfg.checkpoint_url, info.storage_options, ckpt_dir) if cfg.checkpoint_url else None
    if mirror is not None:
        if local_rank == 0:
            mirror.pull_latest()
        dist.barrier()
    step, epoch, batch_pos = 0, 0, 0
    if (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step, epoch, batch_pos = client["step"], client["epoch"], client["batch"]
        if batch_pos >= train_spec.batches_per_rank:
            epoch, batch_pos = epoch + 1, 0
        if rank == 0:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_dir, step, epoch, batch_pos)
    metrics = (run / METRICS).open("a") if rank == 0 else None
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="train", disable=rank != 0)
    last_saved = step
    batches = TimedBatches(loader(train_spec, epoch, batch_pos, cfg.epochs))
    pipe_items = _pipeline_items(batches, device) if pipeline else None
    while epoch < cfg.epochs and step < total_steps:
        while batch_pos < train_spec.batches_per_rank and step < total_steps:
            started, waited, made = time.perf_counter(), batches.waited, batches.made
            _seed_step(cfg, step, rank)
            if pipeline:
                loss = float(engine.train_batch(data_iter=pipe_items))
            else:
                weighted, real = 0.0, 0.0
                for _ in range(cfg.grad_accum):
                    b = next(batches)
                    loss, _ = engine(_inputs(b, device), b["labels"].to(device), b["weights"].to(device))
                    engine.backward(loss)
                    engine.step()
                    weighted += loss.item() * float(b["weights"].sum())
                    real += float(b["weights"].sum())
                # the step's loss over its real samples on every rank (padding rows excluded)
                weighted, real = _sum_over_ranks([weighted, real], device)
                loss = weighted / real if real else None
            batch_pos += cfg.grad_accum
            step += 1
            seconds = time.perf_counter() - started
            samples = cfg.micro_batch_size * cfg.grad_accum * (world // (cfg.pipeline_stages if pipeline else 1))
            if metrics:
                metrics.write(json.dumps({"step": step, "epoch": epoch, "loss": loss, "lr": engine.get_lr()[0],
                                          "step_seconds": seconds, "samples_per_s": samples / seconds,
                                          "data_wait_seconds": batches.waited - waited,
                                          "data_made_seconds": batches.made - made}) + "\n")
                metrics.flush()
            bar.update()
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}")
            if step % cfg.checkpoint_every == 0:
                _save(engine, ckpt_dir, step, epoch, batch_pos, cfg.keep_checkpoints, mirror, local_rank)
                last_saved = step
        if batch_pos >= train_spec.batches_per_rank:
            result = _validate(engine, val_spec, epoch, pipeline, device) if info.counts["val"] else {}
            if metrics and result:
                metrics.write(json.dumps({"epoch": epoch, "step": step, **result}) + "\n")
                metrics.flush()
            epoch, batch_pos = epoch + 1, 0
    bar.close()
    if last_saved != step or not (ckpt_dir / "latest").exists():
        _save(engine, ckpt_dir, step, epoch, batch_pos, cfg.keep_checkpoints, mirror, local_rank)
    tag = (ckpt_dir / "latest").read_text().strip()
    dist.barrier()
    if rank == 0:
        _export(engine, model, job, ckpt_dir, tag, pipeline)
        metrics.close()
    dist.barrier()
    return {"steps": step, "checkpoint": tag}


def ray_worker(config: dict) -> None:
    """Ray Train's loop_per_worker: DeepSpeed on the CPU accelerator where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    context = ray.train.get_context()
    run_worker(config["job"], context.get_world_rank(), context.get_world_size(), context.get_local_rank())
