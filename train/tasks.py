"""Training tasks: what each head of the model predicts, from which field, and how its loss and
metrics are computed. Plain functions on arrays and tensors, shared by the loader (targets),
the model (losses), validation, evaluation, export and predict.

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
import torch
import torch.nn.functional as F

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

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Its head's logits as served: class probabilities, tag probabilities, the number."""
        if self.kind == "classification":
            return torch.softmax(logits, -1)
        if self.kind == "multilabel":
            return torch.sigmoid(logits)
        return logits[:, 0]

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


def _slices(sizes: Sequence[int]) -> list[slice]:
    ends = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def split_outputs(tasks: Sequence[Task], logits: torch.Tensor) -> list[torch.Tensor]:
    return [logits[:, s] for s in _slices([t.outputs for t in tasks])]


def served(tasks: Sequence[Task], logits: torch.Tensor) -> list[torch.Tensor]:
    """The model's logits as served: each task's activated output (export and evaluation)."""
    return [t.activate(part) for t, part in zip(tasks, split_outputs(tasks, logits), strict=True)]


def split_targets(tasks: Sequence[Task], values: torch.Tensor) -> list[torch.Tensor]:
    return [values[:, s] for s in _slices([t.columns for t in tasks])]


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


def _hard_loss(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss against the sample's own target."""
    if task.kind == "classification":
        return F.cross_entropy(logits, target[:, 0].long(), reduction="none")
    if task.kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    return ((logits[:, 0] - target[:, 0]) / task.scale) ** 2


def _soft_loss(task: Task, logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample distillation loss against the teacher's logits: KL(teacher || student) at
    temperature T, times T² (Hinton et al.: keeps its gradients on the hard loss's scale);
    for regression the squared difference of the two predictions in standard units."""
    if task.kind == "classification":
        t = F.log_softmax(teacher / temperature, -1)
        s = F.log_softmax(logits / temperature, -1)
        return (t.exp() * (t - s)).sum(1) * temperature**2
    if task.kind == "multilabel":  # each tag a two-class distribution
        t, s = teacher / temperature, logits / temperature
        kl = (torch.sigmoid(t) * (F.logsigmoid(t) - F.logsigmoid(s))
              + torch.sigmoid(-t) * (F.logsigmoid(-t) - F.logsigmoid(-s)))
        return kl.mean(1) * temperature**2
    return ((logits[:, 0] - teacher[:, 0]) / task.scale) ** 2


@dataclass(frozen=True)
class Distillation:
    alpha: float  # share of the teacher's (soft) loss
    temperature: float


class TaskLoss:
    """The weighted sum of the tasks' masked mean losses; with distillation each task's loss is
    α · soft + (1 − α) · hard, the soft part over every real sample (the teacher answers for
    samples that lack a target too).

    Called with (logits, (values, present, weights[, teacher logits])) — without the teacher's
    logits (validation) the hard loss alone; returns the total and, per task, its loss and the
    number of samples it was averaged over (for logging)."""

    def __init__(self, tasks: Sequence[Task], distillation: Distillation | None = None):
        self.tasks, self.distillation = tuple(tasks), distillation

    def __call__(self, logits: torch.Tensor, targets: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, present, weights, *teacher = targets
        logits = logits.float()
        outputs, wanted = split_outputs(self.tasks, logits), split_targets(self.tasks, values)
        teachers = split_outputs(self.tasks, teacher[0].float()) if teacher else [None] * len(self.tasks)
        total = logits.sum() * 0.0  # keeps the graph connected when a batch has no target at all
        losses, counts = [], []
        for t, task in enumerate(self.tasks):
            mask = present[:, t] * weights
            count = mask.sum()
            loss = (_hard_loss(task, outputs[t], wanted[t]) * mask).sum() / count.clamp(min=1)
            if self.distillation is not None and teacher:  # (without the teacher's logits: hard only)
                a = self.distillation.alpha
                soft = _soft_loss(task, outputs[t], teachers[t], self.distillation.temperature)
                loss = a * (soft * weights).sum() / weights.sum().clamp(min=1) + (1 - a) * loss
                count = weights.sum()
            total = total + task.weight * loss
            losses.append(loss.detach())
            counts.append(count.detach())
        return total, torch.stack(losses), torch.stack(counts)


def loss_sums(per_task: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[2, tasks] float64 on the CPU: each task's loss x samples, and its samples (what a step's
    micro-batches add up before the sum over ranks)."""
    return torch.stack([(per_task * counts).cpu(), counts.cpu()]).double()


VALIDATION_METRIC = {"classification": "accuracy", "multilabel": "micro_f1", "regression": "mae"}
# Per task, what validation sums over ranks: [loss x count, count, a, b, c] with a, b, c
# correct predictions (classification); tp, fp, fn (multilabel); absolute error sum (regression).
TALLY = 5


def tally(tasks: Sequence[Task], logits: torch.Tensor, targets: tuple, loss: TaskLoss) -> np.ndarray:
    """One batch's validation sums, [tasks x TALLY] flattened (the real samples only)."""
    _, losses, counts = loss(logits, targets)
    values, present, weights = targets[:3]
    out = np.zeros((len(tasks), TALLY))
    for t, (task, scores, target) in enumerate(zip(tasks, split_outputs(tasks, logits.float()),
                                                   split_targets(tasks, values), strict=True)):
        keep = (present[:, t] * weights) > 0
        scores, target = scores[keep], target[keep]
        out[t, :2] = float(losses[t]) * float(counts[t]), float(counts[t])
        if task.kind == "classification":
            out[t, 2] = float((scores.argmax(1) == target[:, 0].long()).sum())
        elif task.kind == "multilabel":
            predicted, actual = scores > 0, target > 0.5
            out[t, 2:] = [float((predicted & actual).sum()), float((predicted & ~actual).sum()),
                          float((~predicted & actual).sum())]
        else:
            out[t, 2] = float((scores[:, 0] - target[:, 0]).abs().sum())
    return out.ravel()


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
        total += task.weight * (record["loss"] or 0.0)
        per_task[task.name] = record
    accuracy = next((per_task[t.name]["accuracy"] for t in tasks if t.kind == "classification"), None)
    return {"val_loss": total, "val_accuracy": accuracy, "val_samples": samples, "val_tasks": per_task}
