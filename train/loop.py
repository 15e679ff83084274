"""The program every training worker runs: plain arguments in (rank and world passed
explicitly), so it runs under Ray Train or any other launcher that set up torch.distributed."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from preprocess.storage import Store
from train.config import TrainConfig
from train.data import DatasetInfo, StreamSpec, loader
from train.model import MultimodalModel
from train.parallel import build_engine, resolve_precision
from train.run_store import CHECKPOINTS, Checkpoints, MetricsLog, disk_id, tag_of
from train.saved import META, WEIGHTS, load_model
from train.tasks import TALLY, Distillation, TaskLoss, loss_sums, tally, tasks_meta, validation_record

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainJob:
    cfg: TrainConfig
    info: DatasetInfo
    run: str  # the run's URL (any fsspec store; on a cluster without a shared disk, an object store)
    init_state: dict | None = None  # starting weights (cfg.init_from), checked on the driver
    teacher: tuple[dict, dict] | None = None  # (model.json, weights) of cfg.distill_from, checked on the driver

    def stores(self) -> tuple[Store, Store]:
        """(the run, its checkpoints: train.checkpoint_url or RUN/checkpoints)."""
        run = Store(self.run, self.info.storage_options)
        return run, (Store(self.cfg.checkpoint_url, self.info.storage_options) if self.cfg.checkpoint_url
                     else run.child(CHECKPOINTS))


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


def _targets(batch: dict, inputs: tuple, device, teacher: torch.nn.Module | None) -> tuple:
    """(values, present, weights[, the teacher's logits on the same inputs])."""
    targets = (batch["targets"].to(device), batch["present"].to(device), batch["weights"].to(device))
    if teacher is None:
        return targets
    with torch.no_grad():
        return (*targets, teacher(inputs))


def _pipeline_items(batches, device, teacher: torch.nn.Module | None = None):
    for batch in batches:
        inputs = _inputs(batch, device)
        yield inputs, _targets(batch, inputs, device, teacher)


def _teacher(job: TrainJob, device) -> torch.nn.Module | None:
    """The frozen teacher (eval mode: no dropout), when this run distills."""
    if job.teacher is None:
        return None
    model = load_model(*job.teacher).to(device)
    model.requires_grad_(False)
    return model


def _sum_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _seed_step(cfg: TrainConfig, step: int, rank: int) -> None:
    # dropout draws depend on (seed, step, rank) only, so a resumed run repeats them exactly
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)


def _validate(engine, spec: StreamSpec, epoch: int, pipeline: bool, device) -> dict:
    """Every task's loss (hard targets only) and headline metric on the validation split."""
    tasks = spec.info.tasks
    loss = TaskLoss(tasks)
    sums, samples = np.zeros(len(tasks) * TALLY), 0.0
    engine.eval()
    with torch.no_grad():
        if pipeline:
            items = _pipeline_items(loader(spec, epoch), device)
            for _ in range(spec.batches_per_rank // engine.micro_batches):
                micro = [next(items) for _ in range(engine.micro_batches)]
                _, logits = engine.eval_batch(iter(micro), return_logits=True)
                if engine.is_last_stage():
                    targets = tuple(torch.cat([m[1][i] for m in micro]) for i in range(3))
                    sums += tally(tasks, logits, targets, loss)
                    samples += float(targets[2].sum())
        else:
            for batch in loader(spec, epoch):
                inputs = _inputs(batch, device)
                targets = _targets(batch, inputs, device, None)
                sums += tally(tasks, engine(inputs), targets, loss)
                samples += float(targets[2].sum())
    engine.train()
    if pipeline:
        engine.module.loss_fn.take()  # what eval_batch's losses added is no training step's
    *sums, samples = _sum_over_ranks([*sums, samples], device)
    return validation_record(tasks, sums, int(samples))


def _save(engine, checkpoints: Checkpoints, step: int, epoch: int, batch: int, keep: int,
          keeper: bool) -> str:
    """Save a tag, then point `latest` at it only once every rank's part is in the store.

    (DeepSpeed's own `latest` is written by rank 0 without waiting for the others' ZeRO
    files, so a rank dying mid-save could leave `latest` on an incomplete checkpoint.)"""
    tag = tag_of(step)
    engine.save_checkpoint(str(checkpoints.local), tag=tag,
                           client_state={"step": step, "epoch": epoch, "batch": batch}, save_latest=False)
    dist.barrier()
    if keeper:
        checkpoints.push(tag)
    dist.barrier()
    if dist.get_rank() == 0:
        checkpoints.commit(tag, keep)
    dist.barrier()
    return tag


def _export(engine, model: MultimodalModel, job: TrainJob, checkpoints: Checkpoints, tag: str,
            pipeline: bool) -> None:
    """Consolidated fp32 weights (safetensors) + what is needed to rebuild the model, in the run's store."""
    from safetensors.torch import save

    cfg = job.cfg
    checkpoints.pull(tag)  # every rank's part, wherever it was written
    local = checkpoints.local
    if pipeline:
        for i, layer in enumerate(model.layers()):
            path = local / tag / f"layer_{i:02d}-model_states.pt"
            layer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        state = model.state_dict()
    elif cfg.zero_stage == 0:
        state = engine.module.state_dict()
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=tag)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    run, _ = job.stores()
    run.write_bytes(WEIGHTS, save(state, metadata={"format": "pt"}))
    # (not write_json: its sorted keys would reorder dims, which is the model's input order)
    run.write_bytes(META, json.dumps({
        "dims": job.info.dims, "tasks": tasks_meta(job.info.tasks), "model": cfg.model.model_dump(mode="json"),
        "pixel_mean": job.info.pixel_mean, "pixel_std": job.info.pixel_std, "checkpoint": tag,
    }, indent=1).encode())


def _first_on_its_disk() -> bool:
    """Whether this rank is the lowest of the ranks that share its scratch disk (and so the
    files DeepSpeed writes there): that rank pulls and pushes checkpoints for all of them.
    Found from the disks themselves, not from IPs or Ray's node ranks."""
    disks = [None] * dist.get_world_size()
    dist.all_gather_object(disks, disk_id())
    return disks.index(disks[dist.get_rank()]) == dist.get_rank()


def run_worker(job: TrainJob, rank: int, world: int) -> dict:
    cfg, info = job.cfg, job.info
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    distillation = Distillation(cfg.distill.alpha, cfg.distill.temperature) if job.teacher else None
    model = MultimodalModel(info.dims, info.tasks, cfg.model, TaskLoss(info.tasks, distillation))
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
    run, checkpoint_store = job.stores()
    checkpoints = Checkpoints(checkpoint_store)
    keeper = _first_on_its_disk()
    if keeper:
        checkpoints.prepare()  # this node's scratch gets the latest checkpoint, wherever it was made
    dist.barrier()
    latest = checkpoints.latest()
    step, epoch, batch_pos = 0, 0, 0
    if latest is not None:
        _, client = engine.load_checkpoint(str(checkpoints.local), tag=latest)
        step, epoch, batch_pos = client["step"], client["epoch"], client["batch"]
        if batch_pos >= train_spec.batches_per_rank:
            epoch, batch_pos = epoch + 1, 0
        if rank == 0:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint_store.url_of(latest), step,
                     epoch, batch_pos)
    metrics = MetricsLog(run, step if latest else None) if rank == 0 else None
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="train", disable=rank != 0)
    last_saved = step
    batches = TimedBatches(loader(train_spec, epoch, batch_pos, cfg.epochs))
    teacher = _teacher(job, device) if not pipeline or engine.is_last_stage() else None
    pipe_items = _pipeline_items(batches, device, teacher) if pipeline else None
    try:
        while epoch < cfg.epochs and step < total_steps:
            while batch_pos < train_spec.batches_per_rank and step < total_steps:
                started, waited, made = time.perf_counter(), batches.waited, batches.made
                _seed_step(cfg, step, rank)
                if pipeline:
                    loss = float(engine.train_batch(data_iter=pipe_items))
                    task_sums = engine.module.loss_fn.take()
                else:
                    task_sums = torch.zeros(2, len(info.tasks), dtype=torch.float64)
                    weighted, real = 0.0, 0.0
                    for _ in range(cfg.grad_accum):
                        b = next(batches)
                        inputs = _inputs(b, device)
                        loss, per_task, counts, _ = engine(inputs, _targets(b, inputs, device, teacher))
                        engine.backward(loss)
                        engine.step()
                        weighted += loss.item() * float(b["weights"].sum())
                        real += float(b["weights"].sum())
                        task_sums += loss_sums(per_task, counts)
                    # the step's loss over its real samples on every rank (padding rows excluded)
                    weighted, real = _sum_over_ranks([weighted, real], device)
                    loss = weighted / real if real else None
                # each task's loss over the samples that had its target, on every rank
                task_sums = np.array(_sum_over_ranks(task_sums.ravel().tolist(), device)).reshape(2, -1)
                task_loss = {t.name: (float(s / n) if n else None)
                             for t, s, n in zip(info.tasks, *task_sums, strict=True)}
                batch_pos += cfg.grad_accum
                step += 1
                seconds = time.perf_counter() - started
                samples = cfg.micro_batch_size * cfg.grad_accum * (world // (cfg.pipeline_stages if pipeline else 1))
                if metrics:
                    metrics.write({"step": step, "epoch": epoch, "loss": loss, "task_loss": task_loss,
                                   "lr": engine.get_lr()[0],
                                   "step_seconds": seconds, "samples_per_s": samples / seconds,
                                   "data_wait_seconds": batches.waited - waited,
                                   "data_made_seconds": batches.made - made})
                bar.update()
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                if step % cfg.checkpoint_every == 0:
                    latest = _save(engine, checkpoints, step, epoch, batch_pos, cfg.keep_checkpoints, keeper)
                    last_saved = step
                    if metrics:
                        metrics.upload()
            if batch_pos >= train_spec.batches_per_rank:
                result = _validate(engine, val_spec, epoch, pipeline, device) if info.counts["val"] else {}
                if metrics and result:
                    metrics.write({"epoch": epoch, "step": step, **result})
                    metrics.upload()
                epoch, batch_pos = epoch + 1, 0
    except BaseException:
        if metrics:  # (a peer died, say): the steps trained since the checkpoint reach the store
            metrics.upload()
        raise
    bar.close()
    if latest is None or last_saved != step:
        latest = _save(engine, checkpoints, step, epoch, batch_pos, cfg.keep_checkpoints, keeper)
    if rank == 0:
        _export(engine, model, job, checkpoints, latest, pipeline)
        metrics.close()
    dist.barrier()
    if keeper:
        checkpoints.clear_scratch()  # the store has it all
    return {"steps": step, "checkpoint": latest}


def ray_worker(config: dict) -> None:
    """Ray Train's loop_per_worker: DeepSpeed on the CPU accelerator where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    context = ray.train.get_context()
    run_worker(config["job"], context.get_world_rank(), context.get_world_size())
