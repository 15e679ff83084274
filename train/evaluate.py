"""How good a trained model is: metrics over (labels, class probabilities) accumulated batch by
batch in bounded memory, the batches they are computed on, and per-modality ablation (the
same model with one modality masked out, as if every sample lacked it)."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from preprocess.storage import Store, filesystem, join
from train.config import TrainConfig
from train.data import DatasetInfo, StreamSpec, loader
from train.model import MultimodalModel
from train.saved import RUN_CONFIG, load_model, read_saved

log = logging.getLogger(__name__)

EVAL, PREDICTIONS = "eval.json", "eval-predictions.parquet"
Scorer = Callable[[dict], np.ndarray]  # a batch (features, mask[, pixels]) -> class probabilities


AUC_BINS = 1000
AUC_METHOD = (f"one-vs-rest, from fixed-bin histograms of each class's predicted probability ({AUC_BINS} bins "
              "over [0, 1]) for its positives and negatives, accumulated batch by batch; a positive and a negative "
              "in the same bin count as a tie (half)")


class Metrics:
    """Classification metrics accumulated batch by batch in memory that does not grow with
    the set: the confusion matrix, and per class the histograms of its predicted probability
    over positives and negatives (AUC_BINS bins), from which ROC curves and AUC come."""

    def __init__(self, names: list[str]):
        self.names = names
        k = len(names)
        self.confusion = np.zeros((k, k), np.int64)
        self.positives = np.zeros((k, AUC_BINS), np.int64)
        self.negatives = np.zeros((k, AUC_BINS), np.int64)

    def add(self, labels: np.ndarray, probs: np.ndarray) -> None:
        labels = np.asarray(labels, np.int64)
        if not len(labels):
            return
        np.add.at(self.confusion, (labels, probs.argmax(1)), 1)
        bins = np.minimum((probs * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        for c in range(len(self.names)):
            positive = labels == c
            self.positives[c] += np.bincount(bins[positive, c], minlength=AUC_BINS)
            self.negatives[c] += np.bincount(bins[~positive, c], minlength=AUC_BINS)

    def _roc(self, c: int) -> tuple[float, dict] | None:
        """AUC and the curve (thresholds at bin edges, highest first); None without both classes."""
        pos, neg = self.positives[c], self.negatives[c]
        p, n = pos.sum(), neg.sum()
        if not p or not n:
            return None
        below = np.cumsum(neg) - neg  # negatives in lower bins
        auc = float((pos * (below + neg / 2)).sum() / (p * n))
        tpr = np.concatenate([[0.0], np.cumsum(pos[::-1]) / p])
        fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / n])
        keep = np.concatenate([[True], (np.diff(tpr) > 0) | (np.diff(fpr) > 0)])
        return auc, {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}

    def result(self) -> dict:
        """Accuracy, per-class precision / recall / F1 / ROC-AUC, macro-F1 (over the classes that
        occur in the labels or the predictions, scikit-learn's convention), the confusion matrix
        (rows: true class, columns: predicted). A class's AUC is null when the set has no
        positive or no negative for it."""
        samples = int(self.confusion.sum())
        if not samples:
            return {"samples": 0, "accuracy": None, "macro_f1": None, "macro_roc_auc": None, "per_class": {},
                    "confusion_matrix": [], "roc_curves": {}, "roc_auc_method": AUC_METHOD}
        tp = np.diag(self.confusion)
        support, predicted = self.confusion.sum(1), self.confusion.sum(0)
        precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(tp)),
                       where=precision + recall > 0)
        per_class, curves = {}, {}
        for c, name in enumerate(self.names):
            roc = self._roc(c)
            if roc is not None:
                curves[name] = roc[1]
            per_class[name] = {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                               "support": int(support[c]), "roc_auc": None if roc is None else roc[0]}
        aucs = [v["roc_auc"] for v in per_class.values() if v["roc_auc"] is not None]
        occurring = (support > 0) | (predicted > 0)
        return {
            "samples": samples,
            "accuracy": float(tp.sum() / samples),
            "macro_f1": float(f1[occurring].mean()),
            "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
            "per_class": per_class,
            "confusion_matrix": self.confusion.tolist(),
            "roc_curves": curves,
            "roc_auc_method": AUC_METHOD,
        }


def classification_metrics(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    """Metrics of one set of (labels, probabilities) held in memory."""
    metrics = Metrics(names)
    metrics.add(np.asarray(labels), np.asarray(probs))
    return metrics.result()


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


PREDICTION_SCHEMA = pa.schema([("set", pa.string()), ("key", pa.string()), ("label", pa.string()),
                               ("predicted", pa.string()), ("probabilities", pa.list_(pa.float32()))])


def evaluate_set(batches: Iterable[dict], score: Scorer, dims: dict[str, int], names: list[str],
                 predictions: Callable[[pa.Table], None] | None = None, set_name: str = "") -> dict:
    """Metrics of the model on every batch, and with each modality masked in turn (ablation),
    in one pass; each batch's predictions go to PREDICTIONS (a Parquet writer) as they come."""
    full, ablated = Metrics(names), {m: Metrics(names) for m in dims}
    for batch in batches:
        labels = batch["labels"].numpy()
        probs = score(batch)
        full.add(labels, probs)
        for modality, metrics in ablated.items():
            metrics.add(labels, score(without(batch, dims, modality)))
        if predictions is not None:
            predictions(pa.table({"set": [set_name] * len(labels), "key": batch["keys"],
                                  "label": [names[i] for i in labels], "predicted": [names[i] for i in probs.argmax(1)],
                                  "probabilities": list(probs.astype(np.float32))}, schema=PREDICTION_SCHEMA))
    report = full.result()
    report["ablation"] = {}
    for modality, metrics in ablated.items():
        masked = metrics.result()
        if masked["samples"]:
            report["ablation"][modality] = {
                "accuracy": masked["accuracy"], "macro_f1": masked["macro_f1"],
                "accuracy_drop": report["accuracy"] - masked["accuracy"],
                "macro_f1_drop": report["macro_f1"] - masked["macro_f1"]}
    return report


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
    OTHER_SHARDS (all their labelled samples): RUN/eval.json and RUN/eval-predictions.parquet,
    both made in one streaming pass per set."""
    storage_options = storage_options or {}
    meta, state = read_saved(run, storage_options)
    model = load_model(meta, state)
    shards, cfg = run_record(run, storage_options)
    sets = {"val": (shards, "val"), **{f"shards:{url}": (url, "all") for url in other_shards}}
    result: dict = {"model": meta["checkpoint"], "labels": meta["labels"], "sets": {}}
    out = Store(run, storage_options)
    with tempfile.TemporaryDirectory(prefix="tessera-eval-") as scratch:
        local = f"{scratch}/{PREDICTIONS}"
        with pq.ParquetWriter(local, PREDICTION_SCHEMA) as writer:
            for name, (source, split) in sets.items():
                info = data_for(meta, source, cfg, storage_options)
                result["sets"][name] = evaluate_set(eval_batches(info, split, cfg, batch_size), eager_scorer(model),
                                                    info.dims, meta["labels"], writer.write_table, name)
                log.info("evaluate %s: %d samples, accuracy %s", name, result["sets"][name]["samples"],
                         result["sets"][name]["accuracy"])
        out.put_file(local, PREDICTIONS)
    out.write_json(EVAL, result)
    return result
