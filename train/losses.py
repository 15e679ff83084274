"""The tasks' torch side: each head's activation as served, the masked per-task losses
(with distillation), and the validation tallies. What a task is lives in train/tasks.py,
which prediction reads without torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tessera.train.tasks import TALLY, Task


def activate(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """A head's logits as served: class probabilities, tag probabilities, the number."""
    if task.kind == "classification":
        return torch.softmax(logits, -1)
    if task.kind == "multilabel":
        return torch.sigmoid(logits)
    return logits[:, 0]


def _slices(sizes: Sequence[int]) -> list[slice]:
    ends = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def split_outputs(tasks: Sequence[Task], logits: torch.Tensor) -> list[torch.Tensor]:
    return [logits[:, s] for s in _slices([t.outputs for t in tasks])]


def served(tasks: Sequence[Task], logits: torch.Tensor) -> list[torch.Tensor]:
    """The model's logits as served: each task's activated output (export and evaluation)."""
    return [activate(t, part) for t, part in zip(tasks, split_outputs(tasks, logits), strict=True)]


def split_targets(tasks: Sequence[Task], values: torch.Tensor) -> list[torch.Tensor]:
    return [values[:, s] for s in _slices([t.columns for t in tasks])]


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
