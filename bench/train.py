"""Training input vs training steps, and step time per parallelism, on 2 CPU workers.

    python bench/train.py [--n 2000] [--epochs 5]

Shards and embeds N samples from make_large.py (default encoders), then trains under ZeRO-0,
ZeRO-2 and a 2-stage pipeline (Ray Train, 2 workers, gloo + DeepSpeed's CPU accelerator, 2
loader workers per rank) and reads rank 0's metrics.jsonl, all measured during real training:
(b) what the model consumes: samples/s of one data-parallel rank (its step time);
(a) what the loader can make meanwhile: batches / (the time its worker processes spent making
    them / loader workers), i.e. its capacity under the same load;
the share of the step time `run_worker` waited on the loader. Prints a/b (target >= 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shard import LABELS, ensure_corpus  # noqa: E402

from tessera.core.storage import Store  # noqa: E402
from tessera.features.config import EmbedConfig  # noqa: E402
from tessera.features.stage import run_embed_stage  # noqa: E402
from tessera.preprocess.config import ShardConfig  # noqa: E402
from tessera.preprocess.stage import run_shard_stage  # noqa: E402
from tessera.train.config import TrainConfig  # noqa: E402
from tessera.train.stage import run_train_stage  # noqa: E402

MODES = {"ZeRO-0": {"zero_stage": 0}, "ZeRO-2": {"zero_stage": 2},
         "pipeline x2": {"parallel": "pipeline", "zero_stage": 0}}


def measured(run: Path, cfg: TrainConfig) -> dict:
    """From rank 0's metrics.jsonl (the first step, with start-up, excluded)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_seconds" in r][1:]
    per_step = cfg.micro_batch_size * cfg.grad_accum  # samples one data-parallel rank takes a step
    busy = sum(r["step_seconds"] for r in steps)
    made = sum(r["data_made_seconds"] for r in steps) / max(cfg.loader_workers, 1)
    return {"consumed": per_step * len(steps) / busy, "capacity": per_step * len(steps) / made,
            "waited": sum(r["data_wait_seconds"] for r in steps) / busy,
            "median_step": statistics.median(r["step_seconds"] for r in steps)}


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
        run_shard_stage(str(manifest), Store(str(shards)), ShardConfig(labels=LABELS), progress=False)
        run_embed_stage(Store(str(shards)), EmbedConfig(), progress=False)
        results = {}
        for name, mode in MODES.items():
            cfg = TrainConfig(**base, **mode)
            run = Path(tmp) / name.replace(" ", "-")
            run_train_stage(Store(str(shards)), Store(str(run)), cfg)
            results[name] = measured(run, cfg)
    print(f"samples: {args.n}, 2 Ray Train workers (CPU, gloo), micro-batch 32, 2 loader workers per rank; "
          "rank 0 during training")
    for name, r in results.items():
        print(f"{name:11s}: (b) consumes {r['consumed']:7.1f} samples/s (step {r['median_step'] * 1000:5.1f} ms "
              f"median), (a) loader makes {r['capacity']:8.1f} samples/s, a/b = {r['capacity'] / r['consumed']:5.1f}, "
              f"waited on the loader {100 * r['waited']:4.1f}% of the step time")
    fastest = max(results.values(), key=lambda r: r["consumed"])
    print(f"a/b = {fastest['capacity'] / fastest['consumed']:.1f}   (target >= 3; b = the fastest-consuming mode)")


if __name__ == "__main__":
    main()
