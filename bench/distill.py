"""Distillation: a small student trained from a larger teacher, against the same student
trained on the labels alone, on 2 CPU workers.

    python bench/distill.py [--n 2000] [--epochs 6] [--inputs text,image] [--student 32,1]

Shards and embeds N samples from make_large.py (their captions come from the mini corpus's,
so the text carries the label; `--inputs image` leaves the text out, a harder task for the
random-weight image encoder), trains a teacher (hidden 256, 3 blocks) on those embeddings,
then two students (`--student` hidden width, blocks; default 32, 1): one distilled from the teacher
(alpha 0.7, T 2), one on the hard labels only.
Exports the distilled student (export.json's `distillation`: the teacher beside it) and
prints parameters, ONNX bytes, validation accuracy, agreement and ONNX samples/s.
"""

from __future__ import annotations

import argparse
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
from tessera.train.config import ExportConfig, ModelConfig, TrainConfig  # noqa: E402
from tessera.train.export import export_run  # noqa: E402
from tessera.train.stage import run_train_stage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--inputs", type=lambda s: tuple(s.split(",")), default=("text", "image"))
    ap.add_argument("--student", type=lambda s: tuple(int(v) for v in s.split(",")), default=(32, 1))
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-corpus")
    args = ap.parse_args()
    import ray

    manifest, _ = ensure_corpus(args.data, args.n)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = dict(workers=2, micro_batch_size=32, epochs=args.epochs, loader_workers=1, checkpoint_every=10_000,
                  lr=3e-3)
    small = ModelConfig(modalities=args.inputs, hidden=args.student[0], blocks=args.student[1])
    with tempfile.TemporaryDirectory() as tmp:
        shards, runs = Path(tmp) / "shards", Path(tmp)
        run_shard_stage(str(manifest), Store(str(shards)), ShardConfig(labels=LABELS), progress=False)
        run_embed_stage(Store(str(shards)), EmbedConfig(), progress=False)
        run_train_stage(Store(str(shards)), Store(str(runs / "teacher")),
                        TrainConfig(model=ModelConfig(modalities=args.inputs, hidden=256, blocks=3), **common))
        alone = run_train_stage(Store(str(shards)), Store(str(runs / "alone")), TrainConfig(model=small, **common))
        run_train_stage(Store(str(shards)), Store(str(runs / "student")), TrainConfig(
            model=small, distill_from=str(runs / "teacher"), distill={"alpha": 0.7, "temperature": 2.0}, **common))
        report = export_run(Store(str(runs / "student")), Store(str(runs / "export")), ExportConfig()).distillation
    teacher, student = report["teacher"], report["student"]
    print(f"samples: {args.n} (make_large.py), inputs {'+'.join(args.inputs)} embeddings, 2 Ray Train workers (CPU), "
          f"{args.epochs} epochs each")
    for name, r in (("teacher", teacher), ("student", student)):
        print(f"{name}: {r['parameters']:,} parameters, ONNX {r['bytes_fp32']:,} bytes fp32 / {r['bytes_int8']:,} "
              f"int8, val accuracy {r['tasks']['label']['accuracy']:.4f}, macro-F1 "
              f"{r['tasks']['label']['macro_f1']:.4f}, ONNX alone {r['onnx_samples_per_s']:,.0f} samples/s")
    accuracy = student["tasks"]["label"]["accuracy"] / teacher["tasks"]["label"]["accuracy"]
    print(f"student / teacher: parameters x{report['parameter_ratio']:.3f} (target <= 0.25), val accuracy "
          f"x{accuracy:.3f} (target >= 0.9), agreement {100 * student['agreement_with_teacher']['label']:.1f}% "
          f"(target >= 85%), ONNX samples/s x{student['onnx_samples_per_s'] / teacher['onnx_samples_per_s']:.2f}")
    print(f"the same student on the labels alone: val accuracy {alone.val_accuracy:.4f}")


if __name__ == "__main__":
    main()
