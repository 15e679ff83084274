"""How good a trained model is: metrics over (labels, class probabilities) as plain
functions (scikit-learn's), the batches they are computed on, and per-modality ablation
(the same model with one modality masked out, as if every sample lacked it)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from preprocess.storage import filesystem, join, write_atomic, write_json
from train.config import TrainConfig
from train.data import DatasetInfo, StreamSpec, loader
from train.model import MultimodalModel
from train.saved import RUN_CONFIG, load_model, read_saved

log = logging.getLogger(__name__)

EVAL, PREDICTIONS = "eval.json", "eval-predictions.parquet"
Scorer = Callable[[dict], np.ndarray]  # a batch (features, mask[, pixels]) -> class probabilities


def classification_metrics(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / one-vs-rest ROC-AUC, macro-F1, the
    confusion matrix (rows: true class, columns: predicted). A class's AUC is null when the
    set has no positive or no negative for it; macro-F1 is over the classes that occur in the
    labels or the predictions (scikit-learn's convention)."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score, roc_curve

    labels = np.asarray(labels)
    if not len(labels):
        return {"samples": 0, "accuracy": None, "macro_f1": None, "macro_roc_auc": None, "per_class": {},
                "confusion_matrix": [], "roc_curves": {}}
    predicted = probs.argmax(1)
    classes = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    per_class, curves = {}, {}
    for c, name in enumerate(names):
        positives = labels == c
        auc = None
        if 0 < positives.sum() < len(labels):
            auc = float(roc_auc_score(positives, probs[:, c]))
            fpr, tpr, _ = roc_curve(positives, probs[:, c])
            curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        per_class[name] = {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                           "support": int(support[c]), "roc_auc": auc}
    aucs = [v["roc_auc"] for v in per_class.values() if v["roc_auc"] is not None]
    return {
        "samples": len(labels),
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
        "roc_curves": curves,
    }


def eval_batches(info: DatasetInfo, split: str, cfg: TrainConfig, batch_size: int = 256) -> Iterator[dict]:
    """Every labelled sample of the split once, in batches, padding rows dropped."""
    spec = StreamSpec(info, split, cfg.val_fraction, batch_size, 1, cfg.seed,
                      cfg.model.image_branch_size if cfg.model.image_branch else None)
    for batch in loader(spec, 0):
        real = batch["weights"] > 0
        yield {"keys": [k for k, r in zip(batch["keys"], real.tolist(), strict=True) if r],
               **{name: batch[name][real] for name in ("features", "mask", "labels", "pixels") if name in batch}}


def without(batch: dict, dims: dict[str, int], modality: str) -> dict:
    """The batch as if no sample had MODALITY (its vector zeroed, its mask bit cleared)."""
    j = list(dims).index(modality)
    start = sum(list(dims.values())[:j])
    features, mask = batch["features"].clone(), batch["mask"].clone()
    features[:, start : start + dims[modality]] = 0
    mask[:, j] = 0
    out = {**batch, "features": features, "mask": mask}
    if modality == "image" and "pixels" in batch:
        out["pixels"] = torch.zeros_like(batch["pixels"])
    return out


def eager_scorer(model: MultimodalModel) -> Scorer:
    def score(batch: dict) -> np.ndarray:
        inputs = (batch["features"], batch["mask"], *([batch["pixels"]] if "pixels" in batch else []))
        with torch.no_grad():
            return torch.softmax(model(inputs), -1).numpy()

    return score


def score_set(batches: Iterable[dict], score: Scorer, dims: dict[str, int], ablate: bool = True) -> dict:
    """Probabilities of every sample, and (ablate) with each modality masked in turn; one
    pass over the batches, so a large set streams."""
    keys, labels, probs = [], [], []
    ablated: dict[str, list] = {m: [] for m in dims} if ablate else {}
    for batch in batches:
        keys += batch["keys"]
        labels.append(batch["labels"].numpy())
        probs.append(score(batch))
        for modality, parts in ablated.items():
            parts.append(score(without(batch, dims, modality)))
    out = {"keys": keys, "labels": np.concatenate(labels) if labels else np.zeros(0, int),
           "probs": np.concatenate(probs) if probs else np.zeros((0, 0))}
    if ablate:
        out["ablated"] = {m: np.concatenate(parts) if parts else None for m, parts in ablated.items()}
    return out


def _report(scored: dict, labels: list[str]) -> dict:
    metrics = classification_metrics(scored["labels"], scored["probs"], labels)
    metrics["ablation"] = {}
    for modality, probs in scored.get("ablated", {}).items():
        if probs is None:  # an empty set
            continue
        masked = classification_metrics(scored["labels"], probs, labels)
        metrics["ablation"][modality] = {
            "accuracy": masked["accuracy"], "macro_f1": masked["macro_f1"],
            "accuracy_drop": metrics["accuracy"] - masked["accuracy"],
            "macro_f1_drop": metrics["macro_f1"] - masked["macro_f1"]}
    return metrics


def run_record(run: str, storage_options: dict) -> tuple[str | list[str], TrainConfig]:
    """The shards a run trained on and its training config (RUN/train-config.json)."""
    fs, root = filesystem(run, storage_options)
    record = json.loads(fs.cat_file(join(root, RUN_CONFIG)))
    return record["shards"], TrainConfig.model_validate(record["config"])


def data_for(meta: dict, shards: str | list[str], cfg: TrainConfig, storage_options: dict) -> DatasetInfo:
    """The shards as the model saw its training data: its labels, widths and pixel statistics."""
    info = DatasetInfo.read(shards, cfg.model.modalities, cfg.val_fraction, storage_options)
    if list(info.labels) != meta["labels"] or info.dims != meta["dims"]:
        raise ValueError(f"{shards} do not fit this model: labels {list(info.labels)} vs {meta['labels']}, "
                         f"embedding widths {info.dims} vs {meta['dims']}")
    return dataclasses.replace(info, pixel_mean=tuple(meta["pixel_mean"]), pixel_std=tuple(meta["pixel_std"]))


def evaluate_run(run: str, other_shards: list[str] = (), storage_options: dict | None = None,
                 batch_size: int = 256) -> dict:
    """Metrics of RUN's model on its validation split and on every shard folder in
    OTHER_SHARDS (all their labelled samples): RUN/eval.json and RUN/eval-predictions.parquet."""
    storage_options = storage_options or {}
    meta, state = read_saved(run, storage_options)
    model = load_model(meta, state)
    shards, cfg = run_record(run, storage_options)
    sets = {"val": (shards, "val"), **{f"shards:{url}": (url, "all") for url in other_shards}}
    result: dict = {"model": meta["checkpoint"], "labels": meta["labels"], "sets": {}}
    columns: dict[str, list] = {"set": [], "key": [], "label": [], "predicted": [], "probabilities": []}
    for name, (source, split) in sets.items():
        info = data_for(meta, source, cfg, storage_options)
        scored = score_set(eval_batches(info, split, cfg, batch_size), eager_scorer(model), info.dims)
        result["sets"][name] = _report(scored, meta["labels"])
        columns["set"] += [name] * len(scored["keys"])
        columns["key"] += scored["keys"]
        columns["label"] += [meta["labels"][i] for i in scored["labels"]]
        columns["predicted"] += [meta["labels"][i] for i in scored["probs"].argmax(1)] if len(scored["keys"]) else []
        columns["probabilities"] += scored["probs"].tolist()
        log.info("evaluate %s: %d samples, accuracy %s", name, len(scored["keys"]), result["sets"][name]["accuracy"])
    fs, root = filesystem(run, storage_options)
    write_json(fs, join(root, EVAL), result)
    buf = io.BytesIO()
    pq.write_table(pa.table(columns, schema=pa.schema([("set", pa.string()), ("key", pa.string()),
                                                        ("label", pa.string()), ("predicted", pa.string()),
                                                        ("probabilities", pa.list_(pa.float32()))])), buf)
    write_atomic(fs, join(root, PREDICTIONS), buf.getvalue())
    return result
