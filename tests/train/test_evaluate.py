"""Evaluation: metrics checked by hand, then a trained mini model's eval.json."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from tessera.core.storage import Store
from tessera.train.evaluate import Metrics, evaluate_run, task_metrics
from tessera.train.tasks import Task
from tests.conftest import LABELS


def classification_metrics(labels, probs, names):
    return task_metrics(Task("t", "t", "classification", tuple(names)), labels, probs)


def test_metrics_of_a_small_hand_worked_example():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1],
                      [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.1, 0.3]])  # predicted 0 1 1 1 2 0
    m = classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (m["per_class"][n] for n in "abc")
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1, 0.8))
    assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((1, 1 / 2, 2 / 3))
    assert m["macro_f1"] == pytest.approx((1 / 2 + 0.8 + 2 / 3) / 3)
    # class a: positives score 0.7, 0.3; negatives 0.2, 0.1, 0.1, 0.6 -> 7 of 8 pairs ordered
    assert a["roc_auc"] == pytest.approx(7 / 8)


def test_a_class_absent_from_the_set_has_no_auc():
    m = classification_metrics(np.array([0, 0, 1]), np.array([[0.9, 0.1, 0], [0.4, 0.6, 0], [0.2, 0.8, 0]]),
                               ["a", "b", "c"])
    assert m["per_class"]["c"]["roc_auc"] is None and m["per_class"]["c"]["support"] == 0
    assert m["macro_roc_auc"] == pytest.approx(np.mean([m["per_class"]["a"]["roc_auc"],
                                                        m["per_class"]["b"]["roc_auc"]]))


def test_batch_by_batch_metrics_equal_one_pass_and_the_binned_auc_is_close_to_the_exact_one():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 5000)
    logits = rng.normal(size=(5000, 4)) + 1.5 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    streamed = Metrics(list("abcd"))
    for start in range(0, 5000, 128):
        streamed.add(labels[start : start + 128], probs[start : start + 128])
    m = streamed.result()
    assert m == classification_metrics(labels, probs, list("abcd"))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    for c, name in enumerate("abcd"):
        assert m["per_class"][name]["roc_auc"] == pytest.approx(roc_auc_score(labels == c, probs[:, c]), abs=1e-3)
    assert "histogram" in m["roc_auc_method"]


def test_multilabel_metrics_of_a_small_hand_worked_example():
    tags = Task("tags", "tags", "multilabel", ("x", "y", "z"))
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.6, 0.1], [0.4, 0.8, 0.2], [0.2, 0.3, 0.7], [0.1, 0.2, 0.3]])
    # predicted (>= 0.5): {x, y}, {y}, {z}, {}
    m = task_metrics(tags, targets, probs)
    # x: tp 1, fn 1; y: tp 1, fp 1, fn 1; z: fp 1  -> tp 2, fp 2, fn 2
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))
    x, y, z = (m["per_tag"][t] for t in "xyz")
    assert (x["precision"], x["recall"], x["f1"]) == pytest.approx((1, 1 / 2, 2 / 3))
    assert (y["precision"], y["recall"], y["f1"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert z["f1"] == 0 and z["support"] == 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)  # z occurs in the predictions
    # x: positives 0.9, 0.4 vs negatives 0.2, 0.1 -> 4 of 4 pairs ordered; y: positives 0.8, 0.3
    # vs negatives 0.6, 0.2 -> 3 of 4; z: no positive, no AUC
    assert (x["roc_auc"], y["roc_auc"], z["roc_auc"]) == (1.0, 0.75, None)
    assert m["macro_roc_auc"] == pytest.approx(0.875)


def test_regression_metrics_of_a_small_hand_worked_example():
    m = task_metrics(Task("score", "score", "regression"), np.array([[1.0], [2.0], [3.0], [6.0]]),
                     np.array([2.0, 2.0, 1.0, 6.0]))
    # errors 1, 0, -2, 0; targets' mean 3, squared deviations 4 + 1 + 0 + 9 = 14
    assert m["mae"] == pytest.approx(3 / 4)
    assert m["rmse"] == pytest.approx(np.sqrt(5 / 4))
    assert m["r2"] == pytest.approx(1 - 5 / 14)
    assert m["samples"] == 4


def test_evaluating_a_mini_run_gives_each_task_the_metrics_of_its_kind(trained_mini, embedded_mini):
    result = evaluate_run(Store(str(trained_mini)), [Store(str(embedded_mini))])
    val = result.sets["val"]
    rows = pq.read_table(trained_mini / "eval-predictions.parquet").to_pylist()
    mine = [r for r in rows if r["set"] == "val"]
    per_task = {t: [r for r in mine if r["task"] == t and r["target"] is not None] for t in val["tasks"]}
    assert val["samples"] == len({r["key"] for r in mine}) == \
        json.loads((trained_mini / "train-summary.json").read_text())["val_samples"]
    assert [t["name"] for t in result.tasks] == ["label", "has_audio", "media", "words"]
    # classification: the confusion matrix counted from the predictions
    label = val["tasks"]["label"]
    pairs = Counter((r["target"], r["predicted"]) for r in per_task["label"])
    by_hand = [[pairs[(t, p)] for p in LABELS] for t in LABELS]
    assert label["confusion_matrix"] == by_hand
    assert label["accuracy"] == pytest.approx(sum(by_hand[i][i] for i in range(len(LABELS))) / len(per_task["label"]))
    for r in per_task["label"]:
        assert r["predicted"] == LABELS[int(np.argmax(r["scores"]))]
        assert sum(r["scores"]) == pytest.approx(1, abs=1e-5)
    assert label["accuracy"] > 1 / len(LABELS)  # better than chance after training
    # a sample missing a task's target is evaluated on the others only
    assert 0 < val["tasks"]["has_audio"]["samples"] == len(per_task["has_audio"]) < val["samples"]
    # multilabel: micro-F1 from the predicted tag lists
    tp = fp = fn = 0
    for r in per_task["media"]:
        target, predicted = set(json.loads(r["target"])), set(json.loads(r["predicted"]))
        tp, fp, fn = tp + len(target & predicted), fp + len(predicted - target), fn + len(target - predicted)
    assert val["tasks"]["media"]["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # regression: MAE from the predicted numbers
    errors = [abs(float(r["predicted"]) - float(r["target"])) for r in per_task["words"]]
    assert val["tasks"]["words"]["mae"] == pytest.approx(np.mean(errors), rel=1e-5)
    for task, metrics in val["tasks"].items():
        assert set(metrics["ablation"]) == {"text", "image", "audio", "video"}, task
    for modality, masked in label["ablation"].items():
        assert masked["accuracy_drop"] == pytest.approx(label["accuracy"] - masked["accuracy"]), modality
    for modality, masked in val["tasks"]["words"]["ablation"].items():  # an error that grows is a drop
        assert masked["mae_drop"] == pytest.approx(masked["mae"] - val["tasks"]["words"]["mae"]), modality
    every = result.sets[f"shards:{embedded_mini}"]
    assert every["samples"] == 43  # every sample of the other shard folder has a target
    assert json.loads((trained_mini / "eval.json").read_text()) == json.loads(json.dumps(result.to_json()))
