"""Fine-tuning the encoder towers on 2 CPU workers, in one run.

    python bench/finetune.py [--n 160] [--steps 6] [--retrieval-n 2000] [--retrieval-epochs 3]

(a) and (b): a ViT-B/32-sized CLIP vision tower (random weights, saved to disk and loaded
through the encoders' own path: 88M parameters) and all-MiniLM-L6-v2 (22.7M, real weights)
fine-tuned end to end (train.finetune: [text, image]) on N captioned images from
make_large.py, 2 Ray Train workers of 1 CPU, micro-batch 8:
(a) per rank, at ZeRO 0, 1, 2, 3 and 3 with the optimizer offloaded: the resident memory of
    the largest rank while training (the median over the steps) and its peak (from
    metrics.jsonl), the bytes of the tensors it holds after training (measured: every live
    tensor's storage once), and the model-state bytes ZeRO's arithmetic gives (weights,
    gradients, AdamW's two moments, fp32); goal: ZeRO-3 <= 0.6x ZeRO-0;
(b) samples/s of the fine-tuning stage (ZeRO-0 and ZeRO-2) vs a plain PyTorch DDP loop written
    by hand over the same shards, loader, model, batch and 2 processes (1 thread each, as Ray
    gives a 1-CPU worker), the three in turn for --rounds rounds; goal >= 0.9x. The first step
    (start-up) is left out of each.
(c) CLIP's contrastive objective alone on 2000 captioned make_large images (all-MiniLM-L6-v2 and
    a small random CLIP vision tower): the loss and validation recall@1/5/10 both ways with the
    towers frozen (only the projections train) and trained end to end (their vectors embedded
    by `embed --from-run`'s path before evaluation).
(b) also gives the model FLOPs of a training sample (forward and backward, counted by torch's
FlopCounterMode on a real batch) and so each run's FLOP/s per worker, and on a known GPU (or
with --peak-tflops) its model FLOPs utilization (MFU) against the chip's dense bf16 peak.
On a GPU machine the same script runs one worker per GPU with nccl and bf16 (the training stage
picks them; the DDP loop autocasts to bf16), and (a) adds each rank's peak of allocated GPU
memory."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shard import LABELS, ensure_corpus  # noqa: E402

from tessera.core.storage import Store  # noqa: E402
from tessera.features.config import EmbedConfig, ImageEncoderConfig  # noqa: E402
from tessera.features.stage import run_embed_stage  # noqa: E402
from tessera.preprocess.config import ShardConfig  # noqa: E402
from tessera.preprocess.stage import run_shard_stage  # noqa: E402
from tessera.train.config import ModelConfig, TrainConfig  # noqa: E402
from tessera.train.stage import run_train_stage  # noqa: E402

VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32, projection_dim=512)
MODES = {"ZeRO-0": {"zero_stage": 0}, "ZeRO-1": {"zero_stage": 1}, "ZeRO-2": {"zero_stage": 2},
         "ZeRO-3": {"zero_stage": 3}, "ZeRO-3 + offload": {"zero_stage": 3, "offload": "optimizer"}}
WORKERS = torch.cuda.device_count() or 2  # one per GPU; without, 2 CPU workers
# dense bf16 peaks (NVIDIA's data sheets, SXM parts; the first name the device's contains)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def vision_tower(folder: Path) -> Path:
    """A ViT-B/32-sized CLIP vision tower with random (seeded) weights, saved as a model folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_B32)).save_pretrained(str(folder))
    return folder


def state_bytes(params: int, stage: int) -> int:
    """Model-state bytes one rank holds in its own memory pool (fp32 weights 4, gradients 4,
    AdamW moments 8 per parameter), as ZeRO partitions them over the workers; offloaded
    optimizer state moves to the host (on CPUs: the same memory, so it is still counted)."""
    weights = 4 * params / (WORKERS if stage >= 3 else 1)
    grads = 4 * params / (WORKERS if stage >= 2 else 1)
    moments = 8 * params / (WORKERS if stage >= 1 else 1)
    return int(weights + grads + moments)


def from_metrics(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_seconds" in r]
    gpu = {"gpu_peak_mb": max(r["gpu_peak_mb"] for r in steps)} if "gpu_peak_mb" in steps[0] else {}
    return {**gpu, "tensor_mb": next(r["tensor_mb"] for r in records if "tensor_mb" in r),
            "peak_mb": max(r["peak_rss_mb"] for r in steps),
            "rss_mb": statistics.median(r["rss_mb"] for r in steps[1:]),
            "step_s": statistics.median(r["step_seconds"] for r in steps[1:]),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in steps[1:])}


def plain_model(cfg: TrainConfig, info, rank: int):
    """The stage's model with its towers and rank RANK's training stream, as a loop written by
    hand builds them."""
    from tessera.train.data import StreamSpec
    from tessera.train.model import MultimodalModel
    from tessera.train.towers import TowerSpec, build_towers

    towers = TowerSpec(info.embed_config, cfg.finetune)
    model = MultimodalModel(info.dims, info.tasks, cfg.model, towers=build_towers(towers))
    return model, StreamSpec(info, "train", cfg.val_fraction, cfg.micro_batch_size, cfg.shuffle_buffer, cfg.seed,
                             None, rank, WORKERS, 1, 1, towers)


def ddp_rank(rank: int, cfg: TrainConfig, info, port: int, out: str) -> None:
    """The loop a user writes by hand: DDP over the same model, loader and batches, AdamW."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tessera.train.data import loader
    from tessera.train.loop import _inputs, _targets
    from tessera.train.parallel import optimizer_and_schedule

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORKERS)
    torch.manual_seed(cfg.seed)
    model, spec = plain_model(cfg, info, rank)
    model = DistributedDataParallel(model.to(device), device_ids=[rank] if on_gpu else None)
    optimizer, schedule = optimizer_and_schedule(model.module, cfg, cfg.max_steps, model.module.towers)
    batches = iter(loader(spec, 0, 0, cfg.epochs))
    times = []
    for _ in range(cfg.max_steps):
        started = time.perf_counter()
        batch = next(batches)
        inputs = _inputs(batch, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(inputs, _targets(batch, inputs, device, None))[0]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def flops_per_sample(cfg: TrainConfig, info) -> float:
    """The model FLOPs of one training sample, forward and backward, as torch's FlopCounterMode
    counts them on the first training batch (its captions' token lengths)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tessera.train.data import loader
    from tessera.train.loop import _inputs, _targets

    model, spec = plain_model(cfg, info, 0)
    batch = next(iter(loader(spec, 0, 0, 1)))
    inputs = _inputs(batch, "cpu")
    with FlopCounterMode(display=False) as counter:
        model(inputs, _targets(batch, inputs, "cpu", None))[0].backward()
    return counter.get_total_flops() / len(batch["weights"])


def peak_flops(override_tflops: float | None) -> float | None:
    """The device's dense bf16 peak FLOP/s (None on a CPU or an unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for chip, tflops in PEAK_BF16_TFLOPS.items() if chip in name), None)


def step_losses(run: Store) -> list[float]:
    records = [json.loads(line) for line in run.read_bytes("metrics.jsonl").decode().splitlines()]
    return [r["loss"] for r in records if r.get("loss") is not None]


def retrieval_part(data: Path, n: int, epochs: int) -> None:
    """(c): CLIP's objective alone on N captioned images, 2 workers: the towers frozen (only the
    projections to the shared space train, on the cached vectors) against the towers trained
    end to end; recall@k on the validation split, each run's vectors embedded first."""
    from tessera.features.encoders import build_encoders
    from tessera.train.evaluate import evaluate_run
    from tessera.train.layout import run_towers

    _, images_only = ensure_corpus(data, n)
    shards = Store(str(data / f"contrastive-shards-{n}"))
    shard = run_shard_stage(str(images_only), shards, ShardConfig(labels=LABELS), progress=False)
    embed = EmbedConfig(audio=None, video=None)  # all-MiniLM-L6-v2 (real weights), a small random CLIP tower
    run_embed_stage(shards, embed, progress=False)
    towers = build_encoders(embed)
    print(f"(c) {shard.accepted} captioned images sharded; towers: all-MiniLM-L6-v2 (real weights) and a CLIP "
          f"vision tower of {sum(p.numel() for p in towers['image']._build(None).parameters()) / 1e6:.2f}M "
          f"parameters (random); {epochs} epochs, 2 workers, micro-batch 16, contrastive loss only", flush=True)
    base = dict(objective="contrastive", contrastive={"pairs": [["image", "text"]], "supervised_weight": 0.0},
                model=ModelConfig(modalities=("text", "image")), workers=WORKERS, micro_batch_size=16,
                epochs=epochs, loader_workers=1, checkpoint_every=10_000, lr=1e-3, encoder_lr=1e-4, zero_stage=2)
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("frozen towers", {}), ("towers trained", {"finetune": ("text", "image")})):
            run = Store(f"{tmp}/{name.split()[1]}")
            started = time.perf_counter()
            run_train_stage(shards, run, TrainConfig(**base, **extra))
            seconds = time.perf_counter() - started
            if extra:  # the run's towers embed the shards (the base vectors stay in the cache)
                run_embed_stage(shards, embed.with_weights(run_towers(run)), progress=False)
            found = evaluate_run(run).sets["val"]["retrieval"]
            losses = step_losses(run)
            tenth = max(1, len(losses) // 10)
            first, last = statistics.mean(losses[:tenth]), statistics.mean(losses[-tenth:])
            print(f"(c) {name:15s}: loss {first:.3f} -> {last:.3f} "
                  f"(first and last tenth of {len(losses)} steps, {seconds:.0f} s); validation recall@1/5/10 "
                  + "; ".join(f"{way} {r['recall@1']:.3f}/{r['recall@5']:.3f}/{r['recall@10']:.3f} "
                              f"of {r['samples']}" for way, r in found.items() if r["samples"]), flush=True)
    run_embed_stage(shards, embed, progress=False)  # the base vectors back in the sidecars (from the cache)


def memory_and_speed(args: argparse.Namespace) -> None:
    """(a) and (b)."""
    import torch.multiprocessing as mp

    from tessera.train.data import DatasetInfo
    from tessera.train.towers import TowerSpec, build_towers

    manifest, _ = ensure_corpus(args.data, args.n)
    unit = "GPU" if torch.cuda.is_available() else "CPU"
    print(f"{WORKERS} Ray Train workers of 1 {unit}, micro-batch 8, {args.steps} steps (the first left out)",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # (kept beside the corpus: embedding it with the ViT-B tower takes minutes, a re-run none)
        tower = vision_tower(args.data / "vit-b32")
        shards = args.data / f"finetune-shards-{args.n}"
        run_shard_stage(str(manifest), Store(str(shards)), ShardConfig(labels=LABELS), progress=False)
        run_embed_stage(Store(str(shards)), EmbedConfig(image=ImageEncoderConfig(weights=str(tower)), audio=None,
                                                        video=None), progress=False)
        base = dict(finetune=("text", "image"), model=ModelConfig(modalities=("text", "image")), workers=WORKERS,
                    micro_batch_size=8, max_steps=args.steps, epochs=100, checkpoint_every=10_000, loader_workers=1,
                    warmup_steps=1)
        cfg = TrainConfig(**base, zero_stage=0)
        info = DatasetInfo.read(Store(str(shards)), cfg.model.modalities, cfg.val_fraction)
        params = sum(p.numel() for p in build_towers(TowerSpec(info.embed_config, cfg.finetune)).parameters())
        print(f"two towers: {params / 1e6:.1f}M parameters (ViT-B/32-sized CLIP vision, random + "
              "all-MiniLM-L6-v2)", flush=True)
        results = {}
        for name in [m for m in args.modes.split(",") if m]:
            mode = MODES[name]
            results[name] = r = train_once(shards, Path(tmp) / "run", TrainConfig(**base, **mode))
            zero0 = results["ZeRO-0"]
            print(f"(a) {name:17s} largest rank: RSS while training {r['rss_mb']:5.0f} MB "
                  f"({r['rss_mb'] / zero0['rss_mb']:4.2f}x ZeRO-0), peak {r['peak_mb']:5.0f} MB "
                  f"({r['peak_mb'] / zero0['peak_mb']:4.2f}x); tensors held after training {r['tensor_mb']:5.0f} MB "
                  f"({r['tensor_mb'] / zero0['tensor_mb']:4.2f}x); model states per rank (computed) "
                  f"{state_bytes(params, mode['zero_stage']) / 2**20:5.0f} MB; step {r['step_s']:5.2f} s"
                  + (f"; GPU peak allocated {r['gpu_peak_mb']:5.0f} MB" if "gpu_peak_mb" in r else ""), flush=True)
        # (b): the stage at ZeRO-0 and ZeRO-2 and the DDP loop in turn, round after round, so
        # that a slower or faster spell of the shared machine touches all three
        os.environ["OMP_NUM_THREADS"] = "1"
        rates = {"ZeRO-0": [], "ZeRO-2": [], "DDP": []}
        for _ in range(args.rounds):
            for name in ("ZeRO-0", "ZeRO-2"):
                rates[name].append(train_once(shards, Path(tmp) / "run",
                                              TrainConfig(**base, **MODES[name]))["samples_per_s"])
            times_file = Path(tmp) / "ddp.json"
            with socket.socket() as s:  # a free port for the DDP processes' rendezvous
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(ddp_rank, args=(cfg, info, port, str(times_file)), nprocs=WORKERS)
            rates["DDP"].append(8 * WORKERS / statistics.median(json.loads(times_file.read_text())[1:]))
    if not args.rounds:
        return
    ddp = statistics.median(rates["DDP"])
    for name in ("ZeRO-0", "ZeRO-2"):
        ratios = [a / b for a, b in zip(rates[name], rates["DDP"], strict=True)]
        print(f"(b) {name}: {statistics.median(rates[name]):5.2f} samples/s vs hand-written DDP {ddp:5.2f} "
              f"samples/s (medians of {args.rounds} alternated rounds): {statistics.median(rates[name]) / ddp:4.2f}x; "
              f"per round {', '.join(f'{r:4.2f}x' for r in ratios)}", flush=True)
    flops, peak = flops_per_sample(cfg, info), peak_flops(args.peak_tflops)
    print(f"(b) model FLOPs of a training sample (forward + backward): {flops / 1e9:.1f} GFLOP", flush=True)
    for name, samples in rates.items():
        per_worker = statistics.median(samples) / WORKERS
        achieved = flops * per_worker
        print(f"(b) {name:6s}: {per_worker:6.2f} samples/s per worker, {achieved / 1e12:7.3f} TFLOP/s per worker"
              + (f", MFU {achieved / peak:6.1%}" if peak else " (MFU: no known peak for this device)"), flush=True)


def train_once(shards: Path, run: Path, cfg: TrainConfig) -> dict:
    run_train_stage(Store(str(shards)), Store(str(run)), cfg)
    found = from_metrics(run)
    shutil.rmtree(run)  # (a checkpoint of this model is 1.8 GB)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-corpus")
    ap.add_argument("--modes", default=",".join(MODES), help="(a)'s modes (ZeRO-0 first: the ratios' base; none: '')")
    ap.add_argument("--rounds", type=int, default=2, help="(b)'s alternated rounds (0: no (b))")
    ap.add_argument("--parts", default="ab,c", help="ab: (a) and (b); c: (c)")
    ap.add_argument("--retrieval-n", type=int, default=2000, help="(c)'s captioned images")
    ap.add_argument("--retrieval-epochs", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (known GPUs: by name)")
    args = ap.parse_args()
    import ray

    # 2 CPUs as the CI machine has; on a GPU machine all its CPUs and GPUs
    ray.init(address="local", num_cpus=None if torch.cuda.is_available() else 2, include_dashboard=False,
             log_to_driver=False)
    parts = args.parts.split(",")
    if "ab" in parts:
        memory_and_speed(args)
    if "c" in parts:
        retrieval_part(args.data / "retrieval", args.retrieval_n, args.retrieval_epochs)


if __name__ == "__main__":
    main()
