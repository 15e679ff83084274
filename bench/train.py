"""Training input pipeline vs training steps, and step time per parallelism, on 2 CPU workers.

    python bench/train.py [--n 2000] [--epochs 2]

Shards and embeds N samples from make_large.py (default encoders), then measures in one run:
(a) the input pipeline alone: one rank's DataLoader (2 loader workers) over the run's epochs, samples/s;
(b) full training steps of that rank under ZeRO-0, ZeRO-2 and a 2-stage pipeline (Ray Train,
    2 workers, gloo + DeepSpeed's CPU accelerator): the samples/s one rank consumes, and the
    median step time. Prints a/b (target >= 3: the loader outpaces the model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shard import LABELS, ensure_corpus  # noqa: E402

from features.config import EmbedConfig  # noqa: E402
from features.stage import run_embed_stage  # noqa: E402
from preprocess.config import ShardConfig  # noqa: E402
from preprocess.stage import run_shard_stage  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import DatasetInfo, StreamSpec, loader  # noqa: E402
from train.stage import run_train_stage  # noqa: E402

MODES = {"ZeRO-0": {"zero_stage": 0}, "ZeRO-2": {"zero_stage": 2},
         "pipeline x2": {"parallel": "pipeline", "zero_stage": 0}}


def loader_rate(shards: Path, cfg: TrainConfig) -> float:
    info = DatasetInfo.read(str(shards), cfg.model.modalities, cfg.val_fraction)
    spec = StreamSpec(info, "train", cfg.val_fraction, cfg.micro_batch_size, cfg.shuffle_buffer, cfg.seed, None,
                      0, cfg.workers, cfg.loader_workers, cfg.grad_accum)
    t0 = time.perf_counter()
    samples = sum(len(b["keys"]) for b in loader(spec, 0, 0, cfg.epochs))  # as training reads it
    return samples / (time.perf_counter() - t0)


def step_stats(run: Path, cfg: TrainConfig) -> tuple[float, float]:
    """(samples/s one data-parallel rank consumes, median step seconds), first step excluded."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_seconds"] for r in records if "step_seconds" in r][1:]
    per_rank = cfg.micro_batch_size * cfg.grad_accum
    median = statistics.median(seconds)
    return per_rank / median, median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-corpus")
    args = ap.parse_args()
    import ray

    manifest, _ = ensure_corpus(args.data, args.n)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = dict(workers=2, micro_batch_size=32, epochs=args.epochs, checkpoint_every=10_000, loader_workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        run_shard_stage(str(manifest), str(shards), ShardConfig(labels=LABELS), progress=False)
        run_embed_stage(str(shards), EmbedConfig(), progress=False)
        a = loader_rate(shards, TrainConfig(**base))
        results = {}
        for name, mode in MODES.items():
            cfg = TrainConfig(**base, **mode)
            run = Path(tmp) / name.replace(" ", "-")
            run_train_stage(str(shards), str(run), cfg)
            results[name] = step_stats(run, cfg)
    print(f"samples: {args.n}, 2 Ray Train workers (CPU, gloo), micro-batch 32, 2 loader workers per rank")
    print(f"(a) input pipeline alone, one rank : {a:8.1f} samples/s")
    for name, (rate, median) in results.items():
        print(f"(b) {name:11s} training, one rank: {rate:8.1f} samples/s, step {median * 1000:6.1f} ms (median)")
    slowest_input_need = max(rate for rate, _ in results.values())
    print(f"a/b = {a / slowest_input_need:.1f}   (target >= 3; b = the fastest-consuming mode)")


if __name__ == "__main__":
    main()
