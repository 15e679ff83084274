"""Training tasks: what each head of the model predicts, from which field, and how its
targets and validation metrics are read. Plain functions on arrays (no torch: prediction
imports this), shared by the loader (targets), validation, evaluation, export and predict;
the losses and activations are in train/losses.py.

A batch's targets are packed like its inputs, so data and pipeline parallelism carry them the
same way: `values` [B, sum(task.columns)] float (a class index, a multi-hot row, a number) and
`present` [B, tasks] float, 0 where the sample lacks that task's target (its loss is masked,
as a padding row's is). The model's output is the tasks' logits side by side,
[B, sum(task.outputs)]; a regression head already answers in the target's own units."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Kind = str  # classification | multilabel | regression
LABEL = "label"  # the manifest's own label field: the default task


@dataclass(frozen=True)
class Task:
    name: str
    field: str  # "label" or a shard.targets field
    kind: Kind
    labels: tuple[str, ...] = ()  # classes (classification) or tags (multilabel)
    weight: float = 1.0
    # regression: the training split's mean and standard deviation; the loss is computed in
    # standard units so that a target's scale does not set its share of the total loss
    center: float = 0.0
    scale: float = 1.0

    @property
    def signature(self) -> tuple:
        """What its head's outputs mean (the training split's statistics aside)."""
        return self.name, self.kind, tuple(self.labels)

    @property
    def outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)

    @property
    def columns(self) -> int:
        """Width of its packed target: a class index, a multi-hot row or a number."""
        return len(self.labels) if self.kind == "multilabel" else 1

    def encode(self, value) -> np.ndarray:
        if self.kind == "classification":
            return np.array([self.labels.index(value)], np.float32)
        if self.kind == "multilabel":
            return np.isin(np.array(self.labels, object), list(value)).astype(np.float32)
        return np.array([value], np.float32)

    def decode(self, scores: np.ndarray):
        """One sample's served scores as the prediction a user reads."""
        if self.kind == "classification":
            return self.labels[int(np.argmax(scores))]
        if self.kind == "multilabel":
            return [tag for tag, p in zip(self.labels, scores, strict=True) if p >= 0.5]
        return float(scores)

    def target_text(self, target: np.ndarray) -> str:
        """A packed target as the prediction records show it."""
        if self.kind == "classification":
            return self.labels[int(target[0])]
        if self.kind == "multilabel":
            return json.dumps([tag for tag, bit in zip(self.labels, target, strict=True) if bit])
        return repr(float(target[0]))


def tasks_from_meta(records: Sequence[dict]) -> tuple[Task, ...]:
    return tuple(Task(**{**r, "labels": tuple(r["labels"])}) for r in records)


def tasks_meta(tasks: Sequence[Task]) -> list[dict]:
    """As model.json holds them (JSON: label sets as lists)."""
    return [{**asdict(t), "labels": list(t.labels)} for t in tasks]


def pack_targets(tasks: Sequence[Task], label, targets: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """A sample's (values, present) from its index row (`label`, the `targets` JSON as a dict:
    values the shard stage checked against their label sets); None when it has no target of
    any task (it is not trained on)."""
    values, present = [], []
    for task in tasks:
        value = label if task.field == LABEL else targets.get(task.field)
        values.append(np.zeros(task.columns, np.float32) if value is None else task.encode(value))
        present.append(0.0 if value is None else 1.0)
    if not any(present):
        return None
    return np.concatenate(values), np.array(present, np.float32)


def agreement(task: Task, a: np.ndarray, b: np.ndarray) -> float:
    """How many of the predictions two models make alike: the same class; the same decision
    per (sample, tag); a regression prediction within 5 % of the target's spread."""
    if task.kind == "classification":
        return float((a.argmax(1) == b.argmax(1)).sum())
    if task.kind == "multilabel":
        return float(((a >= 0.5) == (b >= 0.5)).mean(1).sum())
    return float((np.abs(a - b) <= 0.05 * task.scale).sum())


VALIDATION_METRIC = {"classification": "accuracy", "multilabel": "micro_f1", "regression": "mae"}
# Per task, what validation sums over ranks: [loss x count, count, a, b, c] with a, b, c
# correct predictions (classification); tp, fp, fn (multilabel); absolute error sum (regression).
TALLY = 5


def validation_record(tasks: Sequence[Task], sums: Sequence[float], samples: int) -> dict:
    """The validation record of metrics.jsonl from the summed tallies: the weighted loss, per
    task its loss and VALIDATION_METRIC, and val_accuracy (the first classification task's)."""
    sums = np.asarray(sums).reshape(len(tasks), TALLY)
    per_task, total = {}, 0.0
    for task, (loss, count, a, b, c) in zip(tasks, sums, strict=True):
        if task.kind == "multilabel":
            value = 2 * a / (2 * a + b + c) if a + b + c else None
        else:  # correct predictions (classification) or absolute errors (regression) per sample
            value = a / count if count else None
        record = {"loss": loss / count if count else None, "samples": int(count), VALIDATION_METRIC[task.kind]: value}
        if task.kind == "classification":  # what guessing scores, for a reader of a small validation split
            record["chance"] = 1 / len(task.labels)
        total += task.weight * (record["loss"] or 0.0)
        per_task[task.name] = record
    accuracy = next((per_task[t.name]["accuracy"] for t in tasks if t.kind == "classification"), None)
    return {"val_loss": total, "val_accuracy": accuracy, "val_samples": samples, "val_tasks": per_task}


def epoch_metrics(record: dict) -> dict[str, float]:
    """A validation record of metrics.jsonl under the names tune.metric uses (val.loss,
    val.accuracy, val.<task>.<metric>), with its epoch counted from 1."""
    flat = {"val.loss": record["val_loss"], "val.accuracy": record["val_accuracy"]}
    for task, values in record["val_tasks"].items():
        flat.update({f"val.{task}.{name}": value for name, value in values.items()})
    return {k: float(v) for k, v in flat.items() if v is not None} | {"epoch": record["epoch"] + 1}
