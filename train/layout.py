"""What a training run and an export leave in their folders, each name said once (light
imports: the jobs, reports and `tessera predict` read these without torch or DeepSpeed).

    RUN/train-config.json        the shards and the config the run trains (a resume must match)
    RUN/checkpoints/             DeepSpeed checkpoints, `latest` written last (train.checkpoint_url elsewhere)
    RUN/metrics.jsonl            rank 0's records: one per step, one per validation
    RUN/model.safetensors        consolidated fp32 weights; RUN/model.json what rebuilds the model
    RUN/train-summary.json       TrainSummary, written last
    RUN/eval.json                evaluation per set; RUN/eval-predictions.parquet one row per (sample, task)
    RUN/superseded.parquet       trained on several versions: the keys later ones replaced or removed
    RUN/towers/<modality>/       fine-tuned encoder towers (train.finetune) in their library's own format
                                 (safetensors): a sentence-transformers folder, a transformers CLIP one

    EXPORT/model.safetensors, model.json   as in the run
    EXPORT/preprocess.json       the shard and embed settings and encoders that reproduce the inputs
    EXPORT/model.onnx, model-int8.onnx, model-pruned.onnx   the served graph and its variants
    EXPORT/encoders/             with --bundle: each encoder as ONNX (text.onnx, text-int8.onnx, image...,
                                 audio...; video runs the image graph), the tokenizer, bundle.json
    EXPORT/export.json           each variant's size and validation metrics, written last"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

from tessera.core.storage import Store
from tessera.core.summary import StageSummary
from tessera.train.config import TrainConfig

RUN_CONFIG = "train-config.json"
CHECKPOINTS, LATEST = "checkpoints", "latest"
METRICS = "metrics.jsonl"
# its presence asks a running training to stop at its next epoch's end, checkpointed (a tune
# scheduler stopping a trial); a training starting in the folder removes it
STOP_REQUESTED = "stop-requested"
WEIGHTS, META = "model.safetensors", "model.json"
TRAIN_SUMMARY = "train-summary.json"
EVAL, PREDICTIONS = "eval.json", "eval-predictions.parquet"
SUPERSEDED = "superseded.parquet"
PREPROCESS, EXPORT = "preprocess.json", "export.json"
ONNX = {"fp32": "model.onnx", "int8": "model-int8.onnx", "pruned": "model-pruned.onnx"}
BUNDLE = "encoders"  # the ONNX encoders (tessera export --bundle)
BUNDLE_META, TOKENIZER = "bundle.json", "tokenizer.json"  # in BUNDLE, beside each encoder's graphs
BUNDLE_VARIANTS = ("fp32", "int8")


def encoder_onnx(graph: str, variant: str) -> str:
    """A bundle graph's file: text.onnx, text-int8.onnx, ..."""
    return f"{graph}.onnx" if variant == "fp32" else f"{graph}-{variant}.onnx"


TOWERS = "towers"


def run_towers(run: Store) -> dict[str, str]:
    """The URLs of a run's fine-tuned towers by modality (none: {})."""
    return {m: run.url_of(TOWERS, m) for m in (name.split("/")[1] for name in run.names(f"{TOWERS}/*/config.json"))}


def run_record(cfg: TrainConfig, shards: Store | Sequence[Store]) -> dict:
    """RUN/train-config.json: the shards the run trains on (a folder's URL, or the versions'
    URLs) and its config."""
    return {"shards": shards.url if isinstance(shards, Store) else [s.url for s in shards],
            "config": cfg.model_dump(mode="json")}


@dataclass(frozen=True)
class TrainSummary(StageSummary):
    """train-summary.json: what a training run did. `up_to_date`: it was done before and
    nothing was trained."""

    FILE = TRAIN_SUMMARY

    train_samples: int
    val_samples: int
    tasks: list[str]
    steps: int
    resumed: bool
    first_loss: float | None
    final_loss: float | None
    val_accuracy: float | None
    val_tasks: dict | None
    checkpoint: str | None
    model: str  # the URL of the weights
    init_from: str | None = None
    distilled_from: str | None = None
    pipeline_stages: list[str] | None = None  # what each stage held (parallel: pipeline)


@dataclass(frozen=True)
class ModelMeta:
    """model.json: what rebuilds a trained model, and what its inputs are."""

    dims: dict[str, int]  # modality -> embedding width, in the model's input order
    tasks: list[dict]  # train/tasks.py: tasks_meta (names, kinds, label sets, regression statistics)
    model: dict  # train.model (ModelConfig) as JSON
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    checkpoint: str | None  # the checkpoint tag it was exported from
    align: dict | None = None  # the contrastive objective's projections (model.py: Alignment.meta)
    towers: dict[str, str] | None = None  # fine-tuned towers' encoder identities (in RUN/towers/)

    @classmethod
    def read(cls, folder: Store) -> ModelMeta:
        record = folder.read_json(META)
        if "tasks" not in record:
            raise ValueError(f"{folder.url}: this model was trained by an older tessera (model.json has no tasks): "
                             "train it again")
        return cls(record["dims"], record["tasks"], record["model"], tuple(record["pixel_mean"]),
                   tuple(record["pixel_std"]), record.get("checkpoint"), record.get("align"), record.get("towers"))

    def to_bytes(self) -> bytes:
        # (not write_json: its sorted keys would reorder dims, which is the model's input order;
        # what a model without towers or alignment lacks is left out, as before they existed)
        record = dataclasses.asdict(self)
        return json.dumps({k: v for k, v in record.items() if v is not None or k not in ("align", "towers")},
                          indent=1).encode()

    @property
    def image_branch_size(self) -> int | None:
        """The side of the pixels the model's own image branch takes (None: it has none)."""
        return self.model["image_branch_size"] if self.model.get("image_branch") else None


@dataclass(frozen=True)
class EvalSummary(StageSummary):
    """eval.json: a trained run's metrics per set (its validation split, other shard folders)."""

    FILE = EVAL

    model: str | None  # the checkpoint tag of the weights evaluated
    tasks: list[dict]  # model.json's
    sets: dict[str, dict]  # set name -> {"samples", "tasks": {task: metrics}}
    cascade: dict | None = None  # beside a cloud run (evaluate --cascade): train/cascade.py's curve


@dataclass(frozen=True)
class ExportSummary(StageSummary):
    """export.json, written last: each variant's file, size and validation metrics."""

    FILE = EXPORT

    run: str
    model: str | None
    val_samples: int
    accuracy_tolerance: float
    tasks: list[str]
    variants: dict[str, dict]  # fp32, int8, pruned -> file, bytes, gzip_bytes, tasks, within_tolerance, ...
    bundle: dict | None = None  # the encoders' ONNX bundle (export.bundle)
    distillation: dict | None = None  # a distilled run beside its teacher
