"""The program every training worker runs: plain arguments in (rank and world passed
explicitly), so it runs under Ray Train or any other launcher that set up torch.distributed."""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from tessera.core.lease import Fence
from tessera.core.storage import RetryCount, Store, counting_retries
from tessera.train.config import TrainConfig
from tessera.train.data import DatasetInfo, StreamSpec, loader
from tessera.train.layout import META, STOP_REQUESTED, WEIGHTS, ModelMeta
from tessera.train.losses import Distillation, TaskLoss, loss_sums, tally
from tessera.train.model import Alignment, MultimodalModel
from tessera.train.parallel import build_engine, init_distributed, resolve_precision, stage_layouts
from tessera.train.run_store import UNIVERSAL, Checkpoints, MetricsLog, disk_id, tag_of
from tessera.train.saved import load_model
from tessera.train.tasks import TALLY, tasks_meta, validation_record
from tessera.train.towers import TowerSpec, build_towers, save_towers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    cfg: TrainConfig
    info: DatasetInfo
    run: Store  # the run folder (any store; on a cluster without a shared disk, an object store)
    checkpoints: Store  # train.checkpoint_url, or RUN/checkpoints
    fence: Fence  # the driver's lease on RUN: rank 0 checks it before each commit
    init_state: dict | None = None  # starting weights (cfg.init_from), checked on the driver
    teacher: tuple[dict, dict] | None = None  # (model.json, weights) of cfg.distill_from, checked on the driver


def _inputs(batch: dict, device) -> tuple:
    """The model's inputs (train/model.py) from a loader batch, on DEVICE."""
    inputs = [batch["features"].to(device), batch["mask"].to(device)]
    if "pixels" in batch:
        inputs.append(batch["pixels"].to(device))
    if "towers" in batch:
        inputs.append({m: {k: v.to(device) for k, v in tensors.items()} for m, tensors in batch["towers"].items()})
    return tuple(inputs)


def alignment(cfg: TrainConfig) -> Alignment | None:
    """The contrastive objective's settings (None: the objective is supervised)."""
    pairs = cfg.contrastive_pairs
    c = cfg.contrastive
    return Alignment(pairs, c.dim, c.temperature, c.supervised_weight) if pairs else None


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


def _pipeline_items(batches, device, model: MultimodalModel, teacher: torch.nn.Module | None = None):
    for batch in batches:
        inputs = _inputs(batch, device)
        yield model.pipeline_inputs(inputs), _targets(batch, inputs, device, teacher)


def _teacher(job: TrainJob, device) -> torch.nn.Module | None:
    """The frozen teacher (eval mode: no dropout), when this run distills."""
    if job.teacher is None:
        return None
    model = load_model(*job.teacher).to(device)
    model.requires_grad_(False)
    return model


def _over_ranks(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    """VALUES reduced over every rank (summed, or by OP)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _memory_mb(device) -> dict[str, float]:
    """The largest resident memory of any rank's process now, and its largest peak so far (what
    a node must hold: the peak includes building the model whole before ZeRO partitions it);
    on GPUs also the largest peak of device memory allocated."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    values = [now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    if device.type == "cuda":
        values.append(torch.cuda.max_memory_allocated(device) / 2**20)
    names = ("rss_mb", "peak_rss_mb", "gpu_peak_mb")[: len(values)]
    return dict(zip(names, _over_ranks(values, device, dist.ReduceOp.MAX), strict=True))


def _tensor_mb() -> float:
    """The bytes of every tensor this process holds, each storage once. Between steps: the
    model states as ZeRO left them on this rank (weights, gradients, optimizer moments,
    DeepSpeed's flat buffers and partitions), measured where ZeRO's arithmetic only predicts."""
    import gc

    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.layout == torch.strided:  # (type: no lazy __class__)
            storage = obj.untyped_storage()
            storages[(storage.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()) / 2**20


def _seed_step(cfg: TrainConfig, step: int, rank: int) -> None:
    # dropout draws depend on (seed, step, rank) only, so a resumed run repeats them exactly
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)


def _first_on_its_disk() -> bool:
    """Whether this rank is the lowest of the ranks that share its scratch disk (and so the
    files DeepSpeed writes there): that rank pulls and pushes checkpoints for all of them.
    Found from the disks themselves, not from IPs or Ray's node ranks."""
    disks = [None] * dist.get_world_size()
    dist.all_gather_object(disks, disk_id())
    return disks.index(disks[dist.get_rank()]) == dist.get_rank()


class Trainer:
    """One rank of a training job: `fit` resumes from the latest checkpoint, steps to the end
    (validating at each epoch's end, checkpointing every `checkpoint_every` steps), then
    saves a last checkpoint and exports the consolidated model. Rank and world are passed in,
    so it runs under Ray Train or any launcher that set up torch.distributed."""

    def __init__(self, job: TrainJob, rank: int, world: int):
        cfg, info = job.cfg, job.info
        self.job, self.cfg, self.info, self.rank, self.world = job, cfg, info, rank, world
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        distillation = Distillation(cfg.distill.alpha, cfg.distill.temperature) if job.teacher else None
        self.towers = TowerSpec(info.embed_config, cfg.finetune) if cfg.finetune else None
        self.model = MultimodalModel(info.dims, info.tasks, cfg.model, TaskLoss(info.tasks, distillation),
                                     build_towers(self.towers, cfg.unfreeze_last, cfg.activation_checkpointing)
                                     if self.towers else None, alignment(cfg))
        if job.init_state is not None:  # (the fusion and heads: fine-tuned towers start from their encoders)
            missing, unexpected = self.model.load_state_dict(job.init_state, strict=False)
            if unexpected or any(not k.startswith("towers.") for k in missing):
                raise ValueError(f"init_from: weights that do not fit this model ({unexpected or missing})")
        self.data_world = world // cfg.pipeline_stages if cfg.parallel == "pipeline" else world
        self.steps_per_epoch = self._spec("train", 0).batches_per_rank // cfg.grad_accum
        self.total_steps = min(cfg.max_steps or 1 << 62, cfg.epochs * self.steps_per_epoch)
        init_distributed()
        self.checkpoints = Checkpoints(job.checkpoints)
        self.keeper = _first_on_its_disk()
        if self.keeper:
            self.checkpoints.prepare()  # this node's scratch gets the latest checkpoint
        dist.barrier()
        self.latest = self.checkpoints.latest()
        # the data-parallel ranks that saved it, when not these (a run resumed on more or fewer workers)
        saved = self.checkpoints.saved_world(self.latest) if self.latest else None
        self.saved_world = saved if saved not in (None, self.data_world) else None
        if self.saved_world and cfg.parallel == "pipeline":
            raise ValueError(f"the checkpoint was saved by {saved} data-parallel ranks and this run has "
                             f"{self.data_world}: a pipeline run resumes on the number of workers it was saved with")
        self.engine, data_rank, _, self.pipeline = build_engine(self.model, cfg, world, self.total_steps,
                                                                resolve_precision(cfg, on_gpu),
                                                                load_universal=self.saved_world is not None)
        self.train_spec, self.val_spec = self._spec("train", data_rank), self._spec("val", data_rank)
        self.step = self.epoch = self.batch_pos = self.last_saved = 0
        self.metrics: MetricsLog | None = None

    def _spec(self, split: str, data_rank: int) -> StreamSpec:
        cfg = self.cfg
        return StreamSpec(self.info, split, cfg.val_split, cfg.micro_batch_size, cfg.shuffle_buffer, cfg.seed,
                          cfg.model.image_branch_size if cfg.model.image_branch else None, data_rank,
                          self.data_world, max(1, cfg.loader_workers), cfg.grad_accum, self.towers)

    def resume(self) -> None:
        """Take up the latest checkpoint, wherever it was made (weights, optimizer, data position),
        by as many workers as saved it or another number (through its universal form)."""
        saved_step = None
        if self.latest is not None:
            tag = self.latest
            if self.saved_world:
                if self.keeper:
                    self.checkpoints.universal(self.latest)
                dist.barrier()
                tag = f"{self.latest}{UNIVERSAL}"
            _, client = self.engine.load_checkpoint(str(self.checkpoints.local), tag=tag)
            saved_step, self.epoch, self.batch_pos = client["step"], client["epoch"], client["batch"]
            self.step = saved_step
            if self.saved_world:
                self._reposition(client["batch"])
                dist.barrier()
                if self.keeper:
                    self.checkpoints.drop_universal(self.latest)
            if self.batch_pos >= self.train_spec.batches_per_rank:
                self.epoch, self.batch_pos = self.epoch + 1, 0
            if self.rank == 0:
                log.info("resumed from %s at step %d (epoch %d, batch %d)%s",
                         self.checkpoints.store.url_of(self.latest), self.step, self.epoch, self.batch_pos,
                         f", saved by {self.saved_world} data-parallel ranks, now {self.data_world}"
                         if self.saved_world else "")
        self.metrics = MetricsLog(self.job.run, saved_step) if self.rank == 0 else None
        if self.metrics and self.pipeline and saved_step is None:
            stages = stage_layouts(self.model, self.engine.module.parts)
            log.info("pipeline stages: %s", "; ".join(f"{i}: {s}" for i, s in enumerate(stages)))
            self.metrics.write({"step": 0, "pipeline_stages": stages})
        self.last_saved = self.step

    def _reposition(self, saved_batch: int) -> None:
        """The epoch's position and the step in this worker count's terms (a checkpoint saved by
        SAVED_WORLD ranks): the same share of the epoch done, the rest of it drawn under the new
        rank layout (about as many samples, not the same ones), and the learning-rate schedule
        set to the step that share is (its length is this layout's)."""
        cfg = self.cfg
        saved_per_rank = dataclasses.replace(self.train_spec, world=self.saved_world).batches_per_rank
        done = min(1.0, saved_batch / saved_per_rank)
        self.batch_pos = round(done * self.train_spec.batches_per_rank / cfg.grad_accum) * cfg.grad_accum
        self.step = self.epoch * self.steps_per_epoch + self.batch_pos // cfg.grad_accum
        schedule = self.engine.lr_scheduler
        schedule.last_epoch = self.step - 1
        schedule.step()  # the learning rates of the new step

    def train_step(self, batches: TimedBatches, pipe_items, teacher: torch.nn.Module | None) -> float | None:
        """One optimizer step (grad_accum micro-batches); its record goes to metrics.jsonl."""
        cfg, info, engine, device = self.cfg, self.info, self.engine, self.device
        started, waited, made = time.perf_counter(), batches.waited, batches.made
        _seed_step(cfg, self.step, self.rank)
        if self.pipeline:
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
            weighted, real = _over_ranks([weighted, real], device)
            loss = weighted / real if real else None
        # each task's loss over the samples that had its target, on every rank
        task_sums = np.array(_over_ranks(task_sums.ravel().tolist(), device)).reshape(2, -1)
        task_loss = {t.name: (float(s / n) if n else None) for t, s, n in zip(info.tasks, *task_sums, strict=True)}
        self.batch_pos += cfg.grad_accum
        self.step += 1
        seconds = time.perf_counter() - started
        samples = cfg.micro_batch_size * cfg.grad_accum * (self.world // (cfg.pipeline_stages if self.pipeline else 1))
        memory = _memory_mb(device)
        if self.metrics:
            self.metrics.write({"step": self.step, "epoch": self.epoch, "loss": loss, "task_loss": task_loss,
                                "lr": engine.get_lr()[0], "step_seconds": seconds, "samples_per_s": samples / seconds,
                                "data_wait_seconds": batches.waited - waited,
                                "data_made_seconds": batches.made - made, **memory})
        return loss

    def validate(self) -> dict:
        """Every task's loss (hard targets only) and headline metric on the validation split."""
        engine, spec, device = self.engine, self.val_spec, self.device
        tasks = spec.info.tasks
        loss = TaskLoss(tasks)
        sums, samples = np.zeros(len(tasks) * TALLY), 0.0
        engine.eval()
        with torch.no_grad():
            if self.pipeline:
                items = _pipeline_items(loader(spec, self.epoch), device, self.model)
                for _ in range(spec.batches_per_rank // engine.micro_batches):
                    micro = [next(items) for _ in range(engine.micro_batches)]
                    _, logits = engine.eval_batch(iter(micro), return_logits=True)
                    if engine.is_last_stage():
                        targets = tuple(torch.cat([m[1][i] for m in micro]) for i in range(3))
                        sums += tally(tasks, logits, targets, loss)
                        samples += float(targets[2].sum())
            else:
                for batch in loader(spec, self.epoch):
                    inputs = _inputs(batch, device)
                    targets = _targets(batch, inputs, device, None)
                    sums += tally(tasks, engine(inputs), targets, loss)
                    samples += float(targets[2].sum())
        engine.train()
        if self.pipeline:
            engine.module.loss_fn.take()  # what eval_batch's losses added is no training step's
        *sums, samples = _over_ranks([*sums, samples], device)
        return validation_record(tasks, sums, int(samples))

    def end_epoch(self) -> None:
        result = self.validate() if self.info.counts["val"] else {}
        if self.metrics and result:
            self.metrics.write({"epoch": self.epoch, "step": self.step, **result})
            self.metrics.upload()
        self.epoch, self.batch_pos = self.epoch + 1, 0

    def stop_requested(self) -> bool:
        """Whether RUN/stop-requested is there (rank 0 looks; every rank gets its answer)."""
        asked = self.rank == 0 and self.job.run.exists(STOP_REQUESTED)
        return _over_ranks([float(asked)], self.device)[0] > 0

    def checkpoint(self) -> None:
        """Save a tag, then point `latest` at it only once every rank's part is in the store.

        (DeepSpeed's own `latest` is written by rank 0 without waiting for the others' ZeRO
        files, so a rank dying mid-save could leave `latest` on an incomplete checkpoint.)"""
        tag = tag_of(self.step)
        self.engine.save_checkpoint(str(self.checkpoints.local), tag=tag, save_latest=False,
                                    client_state={"step": self.step, "epoch": self.epoch, "batch": self.batch_pos})
        dist.barrier()
        if self.keeper:
            self.checkpoints.push(tag)
        dist.barrier()
        if self.rank == 0:
            self.job.fence.check(f"checkpoint {tag}")
            self.checkpoints.commit(tag, self.cfg.keep_checkpoints)
        dist.barrier()
        self.latest, self.last_saved = tag, self.step
        if self.metrics:
            self.metrics.upload()

    def export(self) -> None:
        """Consolidated fp32 weights (safetensors) + what rebuilds the model, in the run's store (rank 0)."""
        from safetensors.torch import save

        cfg, tag = self.cfg, self.latest
        self.checkpoints.pull(tag)  # every rank's part, wherever it was written
        local = self.checkpoints.local
        if self.pipeline:
            for i, layer in enumerate(self.model.layers()):
                path = local / tag / f"layer_{i:02d}-model_states.pt"
                layer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            state = self.model.state_dict()
        elif cfg.zero_stage == 0:
            state = self.engine.module.state_dict()
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=tag)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        info, run = self.info, self.job.run
        self.job.fence.check("the exported model")
        towers = save_towers(self.towers, state, run, cfg.unfreeze_last) if self.towers else None
        run.write_bytes(WEIGHTS, save({k: v for k, v in state.items() if not k.startswith("towers.")},
                                      metadata={"format": "pt"}))
        align = alignment(cfg)
        run.write_bytes(META, ModelMeta(info.dims, tasks_meta(info.tasks), cfg.model.model_dump(mode="json"),
                                        info.pixel_mean, info.pixel_std, tag, align.meta() if align else None,
                                        towers).to_bytes())

    def stop(self, bar) -> None:
        """End early on request, at an epoch's end: a checkpoint to resume from, no model."""
        bar.close()
        if self.last_saved != self.step:
            self.checkpoint()
        if self.metrics:
            self.metrics.write({"step": self.step, "stopped": True})
            self.metrics.close()
        dist.barrier()

    def fit(self, retried: RetryCount) -> None:
        """Train to the end; RETRIED: the store calls this rank retried (summed over ranks into the last record)."""
        cfg = self.cfg
        self.resume()
        batches = TimedBatches(loader(self.train_spec, self.epoch, self.batch_pos, cfg.epochs))
        teacher = _teacher(self.job, self.device) if not self.pipeline or self.engine.is_last_stage() else None
        pipe_items = _pipeline_items(batches, self.device, self.model, teacher) if self.pipeline else None
        per_rank = self.train_spec.batches_per_rank
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", disable=self.rank != 0)
        try:
            while self.epoch < cfg.epochs and self.step < self.total_steps:
                while self.batch_pos < per_rank and self.step < self.total_steps:
                    loss = self.train_step(batches, pipe_items, teacher)
                    bar.update()
                    if loss is not None:
                        bar.set_postfix(loss=f"{loss:.4f}")
                    if self.step % cfg.checkpoint_every == 0:
                        self.checkpoint()
                if self.batch_pos >= per_rank:
                    self.end_epoch()
                    if self.epoch < cfg.epochs and self.step < self.total_steps and self.stop_requested():
                        return self.stop(bar)
        except BaseException:
            if self.metrics:  # (a peer died, say): the steps trained since the checkpoint reach the store
                self.metrics.upload()
            raise
        bar.close()
        tensor_mb = _over_ranks([_tensor_mb()], self.device, dist.ReduceOp.MAX)[0]
        if self.latest is None or self.last_saved != self.step:
            self.checkpoint()
        retries = int(_over_ranks([float(retried.value)], self.device)[0])
        if self.rank == 0:
            self.export()
            # every rank's retries, this worker group's; the largest rank's tensors after training
            self.metrics.write({"step": self.step, "store_retries": retries, "tensor_mb": tensor_mb})
            self.metrics.close()
        dist.barrier()
        if self.keeper:
            self.checkpoints.clear_scratch()  # the store has it all


def run_worker(job: TrainJob, rank: int, world: int) -> None:
    """One rank's training (what it did reaches the driver through RUN/metrics.jsonl)."""
    with counting_retries() as retried:
        Trainer(job, rank, world).fit(retried)


def in_process_worker(job: TrainJob) -> None:
    """The one rank of a one-worker training, in this process: a tune trial's actor, which Tune
    reuses from trial to trial, so no Ray Train controller and worker group start for each. The
    process group (a world of one) is made once per process and kept (DeepSpeed keeps its
    groups from the first init)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        import socket

        with socket.socket() as probe:  # a free port for the rendezvous of one
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # what a launcher sets (DeepSpeed checks LOCAL_RANK)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    run_worker(job, 0, 1)


def ray_worker(config: dict) -> None:
    """Ray Train's loop_per_worker: DeepSpeed on the CPU accelerator where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    context = ray.train.get_context()
    run_worker(config["job"], context.get_world_rank(), context.get_world_size())
