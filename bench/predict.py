"""`tessera predict` throughput on raw samples, fp32 vs int8, in one process on this machine.

    python bench/predict.py [--n 500]

Trains a small model on the mini corpus (shard, embed with the default encoders, 2 Ray Train
workers), exports it (ONNX fp32 + dynamic int8), then predicts the N raw samples of
make_large.py three times: a warm-up pass (file cache, lazy inits; not reported), fp32, int8.
Reports end-to-end samples/s (read, validate, normalize, encode, model), the model's own
share (the ONNX session alone), sizes, and how often int8 agrees with fp32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shard import LABELS, MINI, ensure_corpus  # noqa: E402

from tessera.core.storage import Store  # noqa: E402
from tessera.features.config import EmbedConfig  # noqa: E402
from tessera.features.stage import run_embed_stage  # noqa: E402
from tessera.preprocess.config import ShardConfig  # noqa: E402
from tessera.preprocess.stage import run_shard_stage  # noqa: E402
from tessera.train.config import ExportConfig, TrainConfig  # noqa: E402
from tessera.train.export import export_run  # noqa: E402
from tessera.train.stage import run_train_stage  # noqa: E402
from tessera.workflows.predict import Predictor, predict_inputs  # noqa: E402


def mini_export(scratch: Path, model: Path, cfg: ExportConfig) -> dict:
    """A model trained on the mini corpus (shard, embed with the default encoders, 2 Ray Train
    workers on a local Ray, shut down after) exported to MODEL; export.json's content."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    shards, run = scratch / "shards", scratch / "run"
    run_shard_stage(str(MINI / "manifest.jsonl"), Store(str(shards)), ShardConfig(labels=LABELS), progress=False)
    run_embed_stage(Store(str(shards)), EmbedConfig(), progress=False)
    run_train_stage(Store(str(shards)), Store(str(run)), TrainConfig(epochs=8, micro_batch_size=4, loader_workers=0))
    exported = export_run(Store(str(run)), Store(str(model)), cfg)
    ray.shutdown()  # what runs next measures this machine's cores: Ray's workers would compete for them
    return exported


def timed_pass(model: Path, variant: str, manifest: Path) -> dict:
    predictor = Predictor(Store(str(model)), variant)
    score, model_seconds = predictor.score, [0.0]

    def timed_score(batch):
        t0 = time.perf_counter()
        probs = score(batch)
        model_seconds[0] += time.perf_counter() - t0
        return probs

    predictor.score = timed_score
    t0 = time.perf_counter()
    records = list(predict_inputs(predictor, [str(manifest)]))
    seconds = time.perf_counter() - t0
    predicted = [r for r in records if not r.get("rejected")]
    return {"samples": len(predicted), "seconds": seconds, "model_seconds": model_seconds[0],
            "labels": {r["key"]: r["predictions"]["label"] for r in predicted}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-predict")
    args = ap.parse_args()
    manifest, _ = ensure_corpus(args.data, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        exported = mini_export(Path(tmp), model, ExportConfig())
        timed_pass(model, "fp32", manifest)  # warm-up
        results = {variant: timed_pass(model, variant, manifest) for variant in ("fp32", "int8")}
    fp32, int8 = results["fp32"], results["int8"]
    agree = sum(fp32["labels"][k] == int8["labels"].get(k) for k in fp32["labels"]) / max(len(fp32["labels"]), 1)
    sizes = {v: exported.variants[v]["bytes"] for v in ("fp32", "int8")}
    print(f"{args.n} raw samples from make_large.py, one process, 2 cores; model trained on mini")
    for variant, r in results.items():
        print(f"{variant}: {r['samples'] / r['seconds']:7.1f} samples/s end to end "
              f"({r['seconds']:.1f} s), model alone {r['samples'] / r['model_seconds']:9.0f} samples/s "
              f"({100 * r['model_seconds'] / r['seconds']:.1f}% of the time), {sizes[variant]:,} bytes")
    print(f"int8/fp32: end to end x{fp32['seconds'] / int8['seconds']:.2f}, model alone "
          f"x{fp32['model_seconds'] / int8['model_seconds']:.2f}, size x{sizes['fp32'] / sizes['int8']:.2f} smaller, "
          f"same label on {100 * agree:.1f}% of samples")


if __name__ == "__main__":
    main()
