"""Tasks: packed targets, each kind's loss, masking of missing targets, distillation's loss,
the heads on the model's last layer — plain tensors, no DeepSpeed, no Ray."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tessera.train.config import ModelConfig, TrainConfig
from tessera.train.data import resolve_tasks
from tessera.train.losses import Distillation, TaskLoss, split_outputs
from tessera.train.model import MultimodalModel
from tessera.train.tasks import Task, pack_targets

TASKS = (Task("label", "label", "classification", ("a", "b", "c")),
         Task("tags", "tags", "multilabel", ("x", "y")),
         Task("score", "score", "regression", (), weight=0.5, center=10.0, scale=4.0))


def packed(rows: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, present, weights) of (label, {targets}) rows, all real."""
    pairs = [pack_targets(TASKS, label, targets) for label, targets in rows]
    return (torch.tensor(np.stack([p[0] for p in pairs])), torch.tensor(np.stack([p[1] for p in pairs])),
            torch.ones(len(rows)))


def test_targets_pack_per_task_and_a_missing_one_is_masked():
    values, present = pack_targets(TASKS, "c", {"tags": ["y"], "score": 12.0})
    assert values.tolist() == [2, 0, 1, 12] and present.tolist() == [1, 1, 1]
    values, present = pack_targets(TASKS, None, {"tags": []})  # no label, an empty tag list
    assert values.tolist() == [0, 0, 0, 0] and present.tolist() == [0, 1, 0]
    assert pack_targets(TASKS, None, {}) is None  # nothing to train on


def test_each_kind_has_its_loss_over_the_samples_that_carry_its_target():
    logits = torch.randn(3, 6, requires_grad=True)  # 3 classes, 2 tags, 1 number
    targets = packed([("a", {"tags": ["x"], "score": 14.0}), (None, {"score": 6.0}), ("b", {"tags": []})])
    total, per_task, counts = TaskLoss(TASKS)(logits, targets)
    classes, tags, score = split_outputs(TASKS, logits)
    expected = [F.cross_entropy(classes[[0, 2]], torch.tensor([0, 1])),
                F.binary_cross_entropy_with_logits(tags[[0, 2]], torch.tensor([[1.0, 0.0], [0.0, 0.0]])),
                (((score[:2, 0] - torch.tensor([14.0, 6.0])) / 4.0) ** 2).mean()]
    torch.testing.assert_close(per_task, torch.stack(expected).detach())
    assert counts.tolist() == [2, 2, 2]
    torch.testing.assert_close(total, expected[0] + expected[1] + 0.5 * expected[2])
    # a sample missing a target sends no gradient through that task's head (each task alone)
    for t, missing in ((0, 1), (1, 1), (2, 2)):
        alone = [dataclasses.replace(task, weight=float(i == t)) for i, task in enumerate(TASKS)]
        logits.grad = None
        TaskLoss(alone)(logits, targets)[0].backward()
        assert torch.all(logits.grad[missing] == 0) and logits.grad.abs().sum() > 0, TASKS[t].name


def test_distillation_mixes_the_teachers_soft_targets_with_the_hard_ones():
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 6), torch.randn(4, 6)
    targets = packed([("a", {"tags": ["x"], "score": 9.0}), ("b", {}), ("c", {"tags": ["y"]}), ("a", {})])
    temperature, alpha = 2.0, 0.25
    hard = TaskLoss(TASKS)(logits, targets)[1]
    _, mixed, _ = TaskLoss(TASKS, Distillation(alpha, temperature))(logits, (*targets, teacher))
    s, t = split_outputs(TASKS, logits)[0], split_outputs(TASKS, teacher)[0]
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature**2
    # classification: every sample has a label here, so both parts average over the same 4
    assert mixed[0] == pytest.approx(float(alpha * kl + (1 - alpha) * hard[0]), rel=1e-5)
    # a regression student is pulled to the teacher's number (in standard units) on every sample
    soft_score = (((split_outputs(TASKS, logits)[2] - split_outputs(TASKS, teacher)[2]) / 4.0) ** 2).mean()
    assert mixed[2] == pytest.approx(float(alpha * soft_score + (1 - alpha) * hard[2]), rel=1e-5)
    # a student equal to its teacher has no soft loss: alpha = 1 leaves nothing
    _, same, _ = TaskLoss(TASKS, Distillation(1.0, temperature))(teacher, (*targets, teacher))
    assert torch.allclose(same, torch.zeros(3), atol=1e-6)


def test_heads_sit_on_the_last_pipeline_layer_and_a_regression_head_answers_in_its_units():
    torch.manual_seed(0)
    model = MultimodalModel({"text": 6, "image": 5}, TASKS, ModelConfig(hidden=16, dropout=0.0)).eval()
    x = (torch.randn(5, 11), torch.ones(5, 2))
    out = x
    for layer in model.layers():
        out = layer(out)
    torch.testing.assert_close(out, model(x))
    assert out.shape == (5, 6)
    # the last layer holds one linear map per task; the number is scaled and centred
    head = model.layers()[-1]
    assert [m.out_features for m in head.out] == [3, 2, 1]
    raw = head.out[2](head.norm(model.blocks(model.encoder(x))))[:, 0]
    torch.testing.assert_close(out[:, 5], raw * 4.0 + 10.0)


def test_tasks_resolve_from_the_shards_targets_and_bad_ones_are_refused():
    shard = {"labels": None, "targets": [{"field": "sentiment", "kind": "classification", "labels": None},
                                         {"field": "score", "kind": "regression", "labels": None}]}
    moments = {"score": np.array([4.0, 8.0, 24.0])}  # values 0, 2, 2, 4: mean 2, std sqrt(2)
    tasks = resolve_tasks(TrainConfig(tasks=[{"name": "label"}, {"name": "mood", "field": "sentiment"},
                                             {"name": "score", "weight": 2}]).tasks, shard,
                          {"label": {"b", "a"}, "sentiment": {"pos", "neg"}}, moments)
    assert [(t.name, t.field, t.kind, t.labels) for t in tasks] == [
        ("label", "label", "classification", ("a", "b")), ("mood", "sentiment", "classification", ("neg", "pos")),
        ("score", "score", "regression", ())]
    assert tasks[2].center == 2.0 and tasks[2].scale == pytest.approx(np.sqrt(2)) and tasks[2].weight == 2
    assert resolve_tasks((), shard, {"label": {"z"}}, {})[0].labels == ("z",)  # the default: label only
    with pytest.raises(ValueError, match="neither `label` nor one of shard.targets"):
        resolve_tasks(TrainConfig(tasks=[{"name": "topic"}]).tasks, shard, {}, {})
    with pytest.raises(ValidationError, match="each name once"):
        TrainConfig(tasks=[{"name": "a"}, {"name": "a", "field": "b"}])
    with pytest.raises(ValidationError, match="exclude each other"):
        TrainConfig(init_from="x", distill_from="y")
