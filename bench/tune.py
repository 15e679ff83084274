"""Hyperparameter search on Ray Tune, with and without ASHA, and against a shell loop, in one run.

    python bench/tune.py [--n 2000] [--trials 16] [--epochs 16] [--loop 4]

Shards and embeds N samples from make_large.py (text and image), then searches lr
(loguniform 1e-4..3e-2), dropout, weight decay and the fusion width with `tessera tune`'s stage
— every trial a real training (DeepSpeed ZeRO-2, 1 worker of 1 CPU: trained in the trial's
actor, which Tune reuses), two at a time on 2 CPUs, the same seeded draws in every search:
(a) TRIALS random trials with ASHA and with no scheduler: wall time, trial-epochs trained and
    the best val.loss of each; goal: ASHA >= 2x faster, its best within 0.02 of the other's;
(b) trials per hour of the search (no scheduler) against a sequential shell loop of
    `tessera train --config` over the first LOOP of the same settings (each a process of its
    own, so Ray and the training actors start every time); goal >= 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shard import LABELS, ensure_corpus  # noqa: E402

from tessera.core.engine import execute  # noqa: E402
from tessera.core.lease import DEFAULT_LEASE  # noqa: E402
from tessera.core.storage import Store  # noqa: E402
from tessera.features.config import EmbedConfig  # noqa: E402
from tessera.preprocess.config import ShardConfig  # noqa: E402
from tessera.preprocess.stage import run_shard_stage  # noqa: E402
from tessera.train.config import TrainConfig, TuneConfig  # noqa: E402
from tessera.train.tune import TRIALS_TABLE, TuneStage, trial_config  # noqa: E402

SPACE = {"train.lr": {"loguniform": [1e-4, 3e-2]}, "train.model.dropout": {"uniform": [0.0, 0.4]},
         "train.weight_decay": {"loguniform": [1e-4, 1e-1]}, "train.model.hidden": {"choice": [128, 256, 512]}}


def search(shards: Store, folder: Path, train: TrainConfig, scheduler: str, trials: int) -> tuple[float, list[dict]]:
    import pyarrow.parquet as pq

    tune = TuneConfig(space=SPACE, search="random", scheduler=scheduler, trials=trials, max_concurrent=2,
                      metric="val.loss", mode="min")
    started = time.perf_counter()
    execute(TuneStage(shards, Store(str(folder)), train, tune, DEFAULT_LEASE, {"train": train.model_dump()}),
            DEFAULT_LEASE, progress=False)
    return time.perf_counter() - started, pq.read_table(folder / TRIALS_TABLE).to_pylist()


def shell_loop(shards: Path, folder: Path, train: TrainConfig, rows: list[dict]) -> float:
    """`tessera train --config` once per setting, one after the other; seconds in all."""
    tune = TuneConfig(space=SPACE)
    started = time.perf_counter()
    for n, row in enumerate(rows):
        config = folder / f"trial-{n}.yaml"
        config.write_text(json.dumps({"train": trial_config(train, tune, json.loads(row["settings"])).model_dump(
            mode="json")}))
        subprocess.run([sys.executable, "-m", "tessera.workflows", "train", str(shards), "--run-dir",
                        str(folder / f"run-{n}"), "--config", str(config), "--no-progress", "--workers", "2"],
                       check=True, cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--loop", type=int, default=4, help="settings the shell loop trains (its rate is per trial)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-corpus")
    args = ap.parse_args()
    import ray

    from tessera.features.stage import run_embed_stage

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    _, images = ensure_corpus(args.data, args.n)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    train = TrainConfig(workers=1, cpus_per_worker=1, epochs=args.epochs, micro_batch_size=32, warmup_steps=5,
                        loader_workers=1, checkpoint_every=100_000, val_fraction=0.2,
                        model={"modalities": ["text", "image"]})
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        run_shard_stage(str(images), Store(str(shards)), ShardConfig(labels=LABELS), progress=False)
        run_embed_stage(Store(str(shards)), EmbedConfig(audio=None, video=None), progress=False)
        results = {name: search(Store(str(shards)), Path(tmp) / name, train, name, args.trials)
                   for name in ("asha", "none")}
        ray.shutdown()
        loop_seconds = shell_loop(shards, Path(tmp), train, results["none"][1][:args.loop])

    print(f"samples: {args.n} (text + image), {args.trials} random trials of {args.epochs} epochs, 2 at a time, "
          "1 worker of 1 CPU each (DeepSpeed ZeRO-2 in the trial's reused actor)")
    summary = {}
    for name, (seconds, rows) in results.items():
        best = min(r["last"] for r in rows if r["status"] == "completed")
        epochs = sum(r["epochs"] for r in rows)
        summary[name] = (seconds, best)
        print(f"(a) scheduler {name:4s}: {seconds:6.1f} s, {epochs:3d} trial-epochs, "
              f"{sum(r['status'] == 'stopped' for r in rows):2d} stopped early, best val.loss {best:.3g}")
    (asha_s, asha_best), (none_s, none_best) = summary["asha"], summary["none"]
    print(f"    ASHA: {none_s / asha_s:.2f}x faster (goal >= 2), best {asha_best - none_best:+.3g} against no "
          "scheduler (goal within 0.02)")
    search_rate, loop_rate = 3600 * args.trials / none_s, 3600 * args.loop / loop_seconds
    print(f"(b) trials per hour: search {search_rate:.0f}, shell loop of `tessera train` {loop_rate:.0f} "
          f"({args.loop} trials in {loop_seconds:.0f} s): {search_rate / loop_rate:.2f}x (goal >= 3)")


if __name__ == "__main__":
    main()
