"""How good a trained model is: each task's metrics of its kind (classification, multilabel,
regression) accumulated batch by batch in bounded memory, the batches they are computed on,
and per-modality ablation (the same model with one modality masked out, as if every sample
lacked it)."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tessera.core.engine import Stage, StageRun, execute
from tessera.core.errors import NotAnInput
from tessera.core.lease import DEFAULT_LEASE, Fence, LeaseConfig
from tessera.core.storage import Store
from tessera.features.layout import EmbedSummary
from tessera.train.config import TrainConfig
from tessera.train.data import DatasetInfo, StreamSpec, loader
from tessera.train.inputs import Scorer
from tessera.train.layout import PREDICTIONS, RUN_CONFIG, SUPERSEDED, EvalSummary, ModelMeta
from tessera.train.losses import served, split_targets
from tessera.train.model import MultimodalModel
from tessera.train.saved import load_model, read_saved
from tessera.train.tasks import Task, tasks_from_meta

log = logging.getLogger(__name__)



AUC_BINS = 1000
AUC_METHOD = (f"one-vs-rest, from fixed-bin histograms of each class's predicted probability ({AUC_BINS} bins "
              "over [0, 1]) for its positives and negatives, accumulated batch by batch; a positive and a negative "
              "in the same bin count as a tie (half)")


class Histograms:
    """Per class (or tag), histograms of its predicted probability over its positives and its
    negatives: ROC curves and AUC in memory that does not grow with the set."""

    def __init__(self, k: int):
        self.positives = np.zeros((k, AUC_BINS), np.int64)
        self.negatives = np.zeros((k, AUC_BINS), np.int64)

    def add(self, positive: np.ndarray, probs: np.ndarray) -> None:
        """positive, probs: [n, k] (whether the sample is a positive of column c; its probability)."""
        bins = np.minimum((probs * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        for c in range(len(self.positives)):
            self.positives[c] += np.bincount(bins[positive[:, c], c], minlength=AUC_BINS)
            self.negatives[c] += np.bincount(bins[~positive[:, c], c], minlength=AUC_BINS)

    def roc(self, c: int) -> tuple[float, dict] | None:
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


def _f1(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(tp)), where=precision + recall > 0)
    return precision, recall, f1


class Metrics:
    """Classification metrics accumulated batch by batch in memory that does not grow with
    the set: the confusion matrix and the per-class probability histograms."""

    HEADLINE = ("accuracy", "macro_f1")

    def __init__(self, names: list[str] | tuple[str, ...]):
        self.names = list(names)
        k = len(names)
        self.confusion = np.zeros((k, k), np.int64)
        self.histograms = Histograms(k)

    def add(self, labels: np.ndarray, probs: np.ndarray) -> None:
        """labels: [n] class indices (or [n, 1], as packed targets are)."""
        labels = np.asarray(labels, np.int64).reshape(-1)
        if not len(labels):
            return
        np.add.at(self.confusion, (labels, probs.argmax(1)), 1)
        self.histograms.add(labels[:, None] == np.arange(len(self.names)), probs)

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
        precision, recall, f1 = _f1(tp, predicted, support)
        per_class, curves = {}, {}
        for c, name in enumerate(self.names):
            roc = self.histograms.roc(c)
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


class MultilabelMetrics:
    """Multi-label metrics (a tag is predicted at probability >= 0.5): per tag the counts of
    true / false positives and false negatives, and its probability histograms."""

    HEADLINE = ("micro_f1", "macro_f1")

    def __init__(self, names: list[str] | tuple[str, ...]):
        self.names = list(names)
        self.samples = 0
        self.counts = np.zeros((3, len(names)), np.int64)  # tp, fp, fn per tag
        self.histograms = Histograms(len(names))

    def add(self, targets: np.ndarray, probs: np.ndarray) -> None:
        """targets: [n, tags] multi-hot; probs: [n, tags]."""
        actual, predicted = np.asarray(targets) > 0.5, probs >= 0.5
        self.samples += len(actual)
        self.counts += np.stack([(predicted & actual).sum(0), (predicted & ~actual).sum(0),
                                 (~predicted & actual).sum(0)])
        self.histograms.add(actual, probs)

    def result(self) -> dict:
        """Micro-F1 (over every (sample, tag) decision), macro-F1 (mean over the tags that occur
        in the targets or the predictions), per tag precision / recall / F1 / ROC-AUC."""
        tp, fp, fn = self.counts
        if not self.samples:
            return {"samples": 0, "micro_f1": None, "macro_f1": None, "macro_roc_auc": None, "per_tag": {},
                    "roc_auc_method": AUC_METHOD}
        precision, recall, f1 = _f1(tp, tp + fp, tp + fn)
        per_tag = {}
        for c, name in enumerate(self.names):
            roc = self.histograms.roc(c)
            per_tag[name] = {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                             "support": int(tp[c] + fn[c]), "roc_auc": None if roc is None else roc[0]}
        aucs = [v["roc_auc"] for v in per_tag.values() if v["roc_auc"] is not None]
        occurring = (tp + fn + fp) > 0
        micro = 2 * tp.sum() + fp.sum() + fn.sum()
        return {"samples": self.samples,
                "micro_f1": float(2 * tp.sum() / micro) if micro else 0.0,
                "macro_f1": float(f1[occurring].mean()) if occurring.any() else 0.0,
                "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
                "per_tag": per_tag, "roc_auc_method": AUC_METHOD}


class RegressionMetrics:
    """MAE, RMSE and R² from running sums (float64)."""

    HEADLINE = ("r2", "mae", "rmse")

    def __init__(self, names=()):
        self.sums = np.zeros(5)  # n, |error|, error², y, y²

    def add(self, targets: np.ndarray, predicted: np.ndarray) -> None:
        y = np.asarray(targets, np.float64).reshape(-1)
        error = np.asarray(predicted, np.float64).reshape(-1) - y
        self.sums += [len(y), np.abs(error).sum(), (error**2).sum(), y.sum(), (y**2).sum()]

    def result(self) -> dict:
        n, absolute, squares, total, total_squares = self.sums
        if not n:
            return {"samples": 0, "mae": None, "rmse": None, "r2": None}
        variance = total_squares - total**2 / n  # of the targets, times n
        return {"samples": int(n), "mae": absolute / n, "rmse": float(np.sqrt(squares / n)),
                "r2": float(1 - squares / variance) if variance > 0 else None}


METRICS = {"classification": Metrics, "multilabel": MultilabelMetrics, "regression": RegressionMetrics}
LOWER_IS_BETTER = ("mae", "rmse")


def metrics_for(task: Task):
    return METRICS[task.kind](task.labels)


def task_metrics(task: Task, targets: np.ndarray, scores: np.ndarray) -> dict:
    """Metrics of one set of (packed targets, served scores) held in memory."""
    metrics = metrics_for(task)
    metrics.add(np.asarray(targets), np.asarray(scores))
    return metrics.result()


def eval_batches(info: DatasetInfo, split: str, cfg: TrainConfig, batch_size: int = 256) -> Iterator[dict]:
    """Every sample of the split with a target once, in batches, padding rows dropped."""
    spec = StreamSpec(info, split, cfg.val_split, batch_size, 1, cfg.seed,
                      cfg.model.image_branch_size if cfg.model.image_branch else None)
    for batch in loader(spec, 0):
        real = batch["weights"] > 0
        yield {"keys": [k for k, r in zip(batch["keys"], real.tolist(), strict=True) if r],
               **{name: batch[name][real] for name in ("features", "mask", "targets", "present", "pixels")
                  if name in batch}}


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
    def score(batch: dict) -> dict[str, np.ndarray]:
        inputs = (batch["features"], batch["mask"], *([batch["pixels"]] if "pixels" in batch else []))
        with torch.no_grad():
            logits = model(inputs)
        return {t.name: out.numpy() for t, out in zip(model.tasks, served(model.tasks, logits), strict=True)}

    return score


PREDICTION_SCHEMA = pa.schema([("set", pa.string()), ("key", pa.string()), ("task", pa.string()),
                               ("target", pa.string()), ("predicted", pa.string()),
                               ("scores", pa.list_(pa.float32()))])


class TaskMetrics:
    """Each task's metrics of its kind over the samples that carry its target."""

    def __init__(self, tasks: Sequence[Task]):
        self.tasks = tuple(tasks)
        self.metrics = {t.name: metrics_for(t) for t in tasks}

    def add(self, batch: dict, scores: dict[str, np.ndarray]) -> None:
        present = batch["present"].numpy() > 0
        for t, (task, targets) in enumerate(zip(self.tasks, split_targets(self.tasks, batch["targets"]), strict=True)):
            rows = present[:, t]
            self.metrics[task.name].add(targets.numpy()[rows], scores[task.name][rows])

    def result(self) -> dict[str, dict]:
        return {task.name: {"kind": task.kind, **self.metrics[task.name].result()} for task in self.tasks}


def headline(task: Task, result: dict) -> dict:
    return {m: result[m] for m in METRICS[task.kind].HEADLINE}


def _prediction_rows(tasks: Sequence[Task], batch: dict, scores: dict[str, np.ndarray], set_name: str) -> pa.Table:
    """One row per (sample, task): its target (null where the sample has none), the prediction."""
    present = batch["present"].numpy() > 0
    columns: dict[str, list] = {name: [] for name in PREDICTION_SCHEMA.names}
    for t, (task, targets) in enumerate(zip(tasks, split_targets(tasks, batch["targets"]), strict=True)):
        task_scores = scores[task.name].reshape(len(present), -1)
        for i, key in enumerate(batch["keys"]):
            columns["set"].append(set_name)
            columns["key"].append(key)
            columns["task"].append(task.name)
            columns["target"].append(task.target_text(targets[i].numpy()) if present[i, t] else None)
            prediction = task.decode(scores[task.name][i])
            columns["predicted"].append(prediction if isinstance(prediction, str) else json.dumps(prediction))
            columns["scores"].append(task_scores[i].astype(np.float32))
    return pa.table(columns, schema=PREDICTION_SCHEMA)


def evaluate_set(batches: Iterable[dict], score: Scorer, dims: dict[str, int], tasks: Sequence[Task],
                 predictions: Callable[[pa.Table], None] | None = None, set_name: str = "") -> dict:
    """Each task's metrics on every batch, and with each modality masked in turn (ablation),
    in one pass; each batch's predictions go to PREDICTIONS (a Parquet writer) as they come.
    An ablation's `<metric>_drop` is how much worse the task got without the modality
    (positive: worse, for scores and errors alike)."""
    full, ablated = TaskMetrics(tasks), {m: TaskMetrics(tasks) for m in dims}
    samples = 0
    for batch in batches:
        scores = score(batch)
        samples += len(batch["keys"])
        full.add(batch, scores)
        for modality, metrics in ablated.items():
            metrics.add(batch, score(without(batch, dims, modality)))
        if predictions is not None:
            predictions(_prediction_rows(tasks, batch, scores, set_name))
    report = {"samples": samples, "tasks": full.result()}
    masked_results = {m: metrics.result() for m, metrics in ablated.items()}
    for task in tasks:
        mine, ablation = report["tasks"][task.name], {}
        for modality, masked in masked_results.items():
            if not masked[task.name]["samples"]:
                continue
            values = headline(task, masked[task.name])
            ablation[modality] = dict(values)
            for metric, value in values.items():
                if value is not None and mine[metric] is not None:
                    worse = value - mine[metric] if metric in LOWER_IS_BETTER else mine[metric] - value
                    ablation[modality][f"{metric}_drop"] = worse
        mine["ablation"] = ablation
    return report


RECALL_AT = (1, 5, 10)


def recall_at_k(queries: np.ndarray, candidates: np.ndarray, ks: Sequence[int] = RECALL_AT,
                block: int = 1024) -> dict[str, float]:
    """Retrieval recall: query i's match is candidate i, found at rank r when r candidates score
    higher (by dot product; ties count for the query); recall@k is the share with r < k.
    Queries go in blocks, so memory is the candidates plus a block of scores."""
    hits = np.zeros(len(ks))
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ candidates.T
        rows = np.arange(len(scores))
        rank = (scores > scores[rows, start + rows][:, None]).sum(axis=1)
        hits += [(rank < k).sum() for k in ks]
    return {f"recall@{k}": float(h / len(queries)) if len(queries) else None for k, h in zip(ks, hits, strict=True)}


class Retrieval:
    """Zero-shot retrieval between each pair of a contrastive model's modalities on a set: the
    samples that have both, each modality's vectors in the shared space, recall@k both ways."""

    def __init__(self, model: MultimodalModel):
        self.model, self.pairs = model, model.alignment.pairs
        self.vectors: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {p: [] for p in self.pairs}

    def watch(self, batches: Iterable[dict]) -> Iterator[dict]:
        names = self.model.encoder.names
        for batch in batches:
            with torch.no_grad():
                for a, b in self.pairs:
                    both = (batch["mask"][:, names.index(a)] * batch["mask"][:, names.index(b)]) > 0
                    if both.any():
                        features = batch["features"][both]
                        self.vectors[(a, b)].append(tuple(
                            torch.nn.functional.normalize(self.model.aligned(features, m), dim=-1).numpy()
                            for m in (a, b)))
            yield batch

    def result(self) -> dict[str, dict]:
        out = {}
        for (a, b), parts in self.vectors.items():
            first = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 1), np.float32)
            second = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 1), np.float32)
            out[f"{a}->{b}"] = {"samples": len(first), **recall_at_k(first, second)}
            out[f"{b}->{a}"] = {"samples": len(first), **recall_at_k(second, first)}
        return out


def trained_on(run: Store) -> tuple[Store | list[Store], TrainConfig]:
    """The shard folders a run trained on and its training config (RUN/train-config.json)."""
    record = run.read_json(RUN_CONFIG)
    shards = record["shards"]
    return (run.at(shards) if isinstance(shards, str) else [run.at(url) for url in shards],
            TrainConfig.model_validate(record["config"]))


def data_for(meta: ModelMeta, shards: Store | list[Store], cfg: TrainConfig, run: Store) -> DatasetInfo:
    """The shards as the model of RUN saw its training data: its tasks (with their label sets
    and regression statistics), widths and pixel statistics (RUN keeps the superseded keys)."""
    info = DatasetInfo.read(shards, cfg.model.modalities, cfg.val_split, cfg.tasks, run.child(SUPERSEDED))
    tasks = tasks_from_meta(meta.tasks)
    found, wanted = [t.signature for t in info.tasks], [t.signature for t in tasks]
    if found != wanted or info.dims != meta.dims:
        raise ValueError(f"{[f.url for f in info.folders]} do not fit this model: tasks {found} vs {wanted}, "
                         f"embedding widths {info.dims} vs {meta.dims}")
    if meta.towers:  # a fine-tuned model reads the vectors of its own towers
        made_by = EmbedSummary.read(info.folders[-1]).encoders
        stale = {m: made_by.get(m) for m, identity in meta.towers.items() if made_by.get(m) != identity}
        if stale:
            raise NotAnInput(f"{info.folders[-1].url} holds {sorted(stale)} vectors of other encoders ({stale}) than "
                             f"the run's fine-tuned towers ({meta.towers}): run `tessera embed SHARDS --from-run "
                             f"{run.url}` first")
    return dataclasses.replace(info, tasks=tasks, pixel_mean=meta.pixel_mean, pixel_std=meta.pixel_std)


class EvalStage(Stage[EvalSummary]):
    """Metrics of RUN's model on its validation split and on every shard folder in OTHER_SHARDS
    (all their samples with a target): RUN/eval.json and RUN/eval-predictions.parquet, both made
    in one streaming pass per set (on the driver: no Ray work)."""

    command = "tessera evaluate"

    def __init__(self, run: Store, other_shards: Sequence[Store] = (), batch_size: int = 256,
                 cascade: Store | None = None, tolerance: float = 0.01):
        """CASCADE: an evaluated cloud run this one (the edge) is measured in front of
        (train/cascade.py), with TOLERANCE the accuracy the cascade may lose against it."""
        self.folder, self.other_shards, self.batch_size = run, list(other_shards), batch_size
        self.cascade, self.tolerance = cascade, tolerance

    def run(self, run: StageRun) -> EvalSummary:
        folder = self.folder
        meta, state = read_saved(folder)
        model = load_model(meta, state)
        shards, cfg = trained_on(folder)
        sets = {"val": (shards, "val"), **{f"shards:{other.url}": (other, "all") for other in self.other_shards}}
        results: dict[str, dict] = {}
        with tempfile.TemporaryDirectory(prefix="tessera-eval-") as scratch:
            local = f"{scratch}/{PREDICTIONS}"
            with pq.ParquetWriter(local, PREDICTION_SCHEMA) as writer:
                for name, (source, split) in sets.items():
                    info = data_for(meta, source, cfg, folder)
                    batches = eval_batches(info, split, cfg, self.batch_size)
                    retrieval = Retrieval(model) if model.alignment else None
                    results[name] = evaluate_set(retrieval.watch(batches) if retrieval else batches,
                                                 eager_scorer(model), info.dims, info.tasks, writer.write_table, name)
                    if retrieval:
                        results[name]["retrieval"] = retrieval.result()
                    log.info("evaluate %s: %d samples, %s", name, results[name]["samples"],
                             {t.name: headline(t, results[name]["tasks"][t.name]) for t in info.tasks})
            run.fence.check(PREDICTIONS)
            folder.put_file(local, PREDICTIONS)
            cascade = self._cascade(pq.read_table(local), tasks_from_meta(meta.tasks)) if self.cascade else None
        return EvalSummary(model=meta.checkpoint, tasks=meta.tasks, sets=results, cascade=cascade)

    def _cascade(self, mine: pa.Table, tasks: Sequence[Task]) -> dict:
        from tessera.train.cascade import cascade_curve

        if not self.cascade.exists(PREDICTIONS):
            raise NotAnInput(f"{self.cascade.url} has no {PREDICTIONS}: evaluate it first (tessera evaluate RUN)")
        task = next((t.name for t in tasks if t.kind == "classification"), None)
        if task is None:
            raise NotAnInput("a cascade is measured on a classification task; this model has none")
        cloud = self.cascade.read_parquet(PREDICTIONS)
        return {"cloud": self.cascade.url, **cascade_curve(mine, cloud, task, self.tolerance)}


def evaluate_run(run: Store, other_shards: Sequence[Store] = (), batch_size: int = 256,
                 lease: LeaseConfig | Fence = DEFAULT_LEASE) -> EvalSummary:
    """EvalStage through the engine, holding RUN's lease (or under LEASE, the fence of a caller
    that holds it)."""
    return execute(EvalStage(run, other_shards, batch_size), lease, progress=False)
