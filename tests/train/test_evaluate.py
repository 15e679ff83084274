"""Evaluation: metrics checked by hand, then a trained mini model's eval.json."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import LABELS
from train.evaluate import Metrics, classification_metrics, evaluate_run


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


def test_evaluating_a_mini_run_matches_a_confusion_matrix_counted_by_hand(trained_mini, embedded_mini):
    result = evaluate_run(str(trained_mini), [str(embedded_mini)])
    val = result["sets"]["val"]
    rows = pq.read_table(trained_mini / "eval-predictions.parquet").to_pylist()
    mine = [r for r in rows if r["set"] == "val"]
    assert val["samples"] == len(mine) == json.loads((trained_mini / "train-summary.json").read_text())["val_samples"]
    pairs = Counter((r["label"], r["predicted"]) for r in mine)
    by_hand = [[pairs[(t, p)] for p in LABELS] for t in LABELS]
    assert val["confusion_matrix"] == by_hand
    assert val["accuracy"] == pytest.approx(sum(by_hand[i][i] for i in range(len(LABELS))) / len(mine))
    for r in mine:
        assert r["predicted"] == LABELS[int(np.argmax(r["probabilities"]))]
        assert sum(r["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert val["accuracy"] > 1 / len(LABELS)  # better than chance after training
    assert set(val["ablation"]) == {"text", "image", "audio", "video"}
    for modality, masked in val["ablation"].items():
        assert masked["accuracy_drop"] == pytest.approx(val["accuracy"] - masked["accuracy"]), modality
    every = result["sets"][f"shards:{embedded_mini}"]
    assert every["samples"] == 43  # all labelled samples of the other shard folder
    assert json.loads((trained_mini / "eval.json").read_text()) == json.loads(json.dumps(result))
