"""How the plain model is parallelized: a DeepSpeed config from TrainConfig, and either a
ZeRO data-parallel engine or a PipelineModule engine over the model's own layers."""

from __future__ import annotations

import itertools
import math

import torch

from tessera.train.config import TrainConfig
from tessera.train.losses import TaskLoss, loss_sums
from tessera.train.model import MultimodalModel


def resolve_precision(cfg: TrainConfig, on_gpu: bool) -> str:
    if not on_gpu:
        return "fp32"  # CPU: DeepSpeed's CPU accelerator trains in fp32 here
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def deepspeed_config(cfg: TrainConfig, data_parallel: int, precision: str, largest: int) -> dict:
    """LARGEST: the most elements of one trainable parameter, which sizes ZeRO's buckets."""
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * data_parallel,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, **offload_config(cfg.offload), **bucket_config(largest)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.offload != "none":
        config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the offloaded state (no compiled op)
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config


def bucket_config(largest: int) -> dict:
    """ZeRO's reduce / all-gather / prefetch buckets sized to the model: each holds its largest
    parameter (5M elements at least). DeepSpeed's defaults (500M elements for the reduce bucket)
    make ZeRO-3 allocate a 2 GB gradient buffer per rank, more than a 110M-parameter model's
    partitioned states (bench/finetune.py)."""
    size = max(5_000_000, largest)
    return {"reduce_bucket_size": size, "allgather_bucket_size": size, "stage3_prefetch_bucket_size": size}


def offload_config(offload: str) -> dict:
    """ZeRO-Offload: the optimizer state (and with `all`, the parameters) in CPU memory."""
    cpu = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"none": {}, "optimizer": {"offload_optimizer": cpu},
            "all": {"offload_optimizer": cpu, "offload_param": cpu}}[offload]


def optimizer_and_schedule(module: torch.nn.Module, cfg: TrainConfig, total_steps: int,
                           encoders: torch.nn.Module | None = None):
    """AdamW (the fine-tuned towers, ENCODERS, at train.encoder_lr, the rest at train.lr) with
    linear warm-up then cosine (or constant) decay, both plain torch. MODULE may hold only a
    part of ENCODERS (a pipeline stage)."""
    in_towers = {id(p) for p in encoders.parameters()} if encoders is not None else set()
    towers, rest = [], []
    for param in module.parameters():
        if param.requires_grad:
            (towers if id(param) in in_towers else rest).append(param)
    # (no empty group: a pipeline stage may hold only a tower, or none)
    groups = [g for g in ({"params": rest, "lr": cfg.lr}, {"params": towers, "lr": cfg.encoder_lr}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PipelineLoss:
    """Loss of the last pipeline stage (targets arrive as the micro-batch's label tuple); keeps
    the per-task sums of the micro-batches since the last `take()`, for logging."""

    def __init__(self, loss: TaskLoss):
        self.loss = loss
        self.sums = torch.zeros(2, len(loss.tasks), dtype=torch.float64)

    def __call__(self, logits: torch.Tensor, targets: tuple) -> torch.Tensor:
        total, per_task, counts = self.loss(logits, targets)
        self.sums += loss_sums(per_task, counts)
        return total

    def take(self) -> torch.Tensor:
        """[2, tasks]: loss x samples and samples per task (zeros on the other stages)."""
        sums, self.sums = self.sums, torch.zeros_like(self.sums)
        return sums


def stage_layouts(model: MultimodalModel, parts: list[int]) -> list[str]:
    """What each pipeline stage holds (PipelineModule's `parts`: the boundaries in the model's
    layers), for a person: "text tower (22.7M trainable)", "image tower, fusion, 2 blocks, heads (0.4M trainable)"."""
    layers, names = model.layers(), model.layer_names()
    layouts = []
    for start, stop in itertools.pairwise(parts):
        held = names[start:stop]
        counted = [f"{held.count(n)} {n}s" if held.count(n) > 1 else n for n in dict.fromkeys(held)]
        trainable = sum(p.numel() for layer in layers[start:stop] for p in layer.parameters() if p.requires_grad)
        layouts.append(f"{', '.join(counted)} ({trainable / 1e6:.1f}M trainable)")
    return layouts


def init_distributed() -> None:
    """DeepSpeed's view of the process group the launcher (Ray Train) created (idempotent)."""
    import deepspeed
    import deepspeed.ops

    # DeepSpeed compiles a shared-memory all-reduce (C++, ~50 s on 2 cores) at the first init on
    # every fresh machine, under a lock file that a worker killed mid-build leaves behind for every
    # later init to wait on forever. It serves only inference all-reduce among ranks on one host;
    # training reduces through gloo/NCCL, so it is never built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_engine(model: MultimodalModel, cfg: TrainConfig, world: int, total_steps: int, precision: str,
                 load_universal: bool = False):
    """(engine, data-parallel rank, data-parallel size, is pipeline); with LOAD_UNIVERSAL, the
    engine loads DeepSpeed's universal checkpoints (another number of ranks saved the one resumed)."""
    import deepspeed

    init_distributed()
    if cfg.parallel == "pipeline":
        from deepspeed.pipe import PipelineModule

        # stages balanced by trainable parameters: a big tower gets a stage of its own; the
        # tokens' length changes from batch to batch (dynamic shapes)
        module = PipelineModule(layers=model.layers(), num_stages=cfg.pipeline_stages,
                                loss_fn=PipelineLoss(model.loss), partition_method="parameters",
                                activation_checkpoint_interval=0, dynamic_shape=model.towers is not None)
        data_parallel = world // cfg.pipeline_stages
    else:
        module = model
        data_parallel = world
    optimizer, schedule = optimizer_and_schedule(module, cfg, total_steps, model.towers)
    largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
    config = deepspeed_config(cfg, data_parallel, precision, largest)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=config)
    if cfg.parallel == "pipeline":
        return engine, engine.grid.get_data_parallel_rank(), data_parallel, True
    return engine, engine.global_rank, data_parallel, False
