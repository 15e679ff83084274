"""Choosing a hybrid deployment's threshold (serve.fallback.min_confidence): an edge model
answers the samples it is sure of and forwards the rest to a cloud model. On the validation
predictions both runs' evaluations wrote (RUN/eval-predictions.parquet), for each threshold t
the cascade forwards the samples whose edge top probability is under t; its accuracy is the
cloud's on those and the edge's on the rest. The recommended threshold is the lowest whose
cascade accuracy is within the tolerance of the cloud's alone: the fewest samples forwarded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tessera.core.errors import NotAnInput

THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)


def _val_rows(predictions: pa.Table, task: str) -> pa.Table:
    """A run's validation predictions of TASK on samples with a target: key, correct, top."""
    rows = predictions.filter(pc.and_(pc.and_(pc.equal(predictions["set"], "val"), pc.equal(predictions["task"], task)),
                                      pc.is_valid(predictions["target"])))
    top = [max(scores) for scores in rows["scores"].to_pylist()]  # (a validation split's rows)
    return pa.table({"key": rows["key"], "correct": pc.equal(rows["predicted"], rows["target"]),
                     "top": pa.array(top, pa.float32())})


def cascade_curve(edge: pa.Table, cloud: pa.Table, task: str, tolerance: float) -> dict:
    """The cascade of EDGE's and CLOUD's validation predictions of the classification TASK, per
    threshold, and the recommended threshold (eval.json's `cascade`)."""
    joined = _val_rows(edge, task).join(_val_rows(cloud, task), "key", join_type="inner", left_suffix="_edge",
                                        right_suffix="_cloud")
    if not len(joined):
        raise NotAnInput(f"the two runs have no validation sample of task {task!r} in common: a cascade is "
                         "measured on samples both models were evaluated on (the same shards and split)")
    edge_correct = joined["correct_edge"].to_numpy(zero_copy_only=False)
    cloud_correct = joined["correct_cloud"].to_numpy(zero_copy_only=False)
    top = joined["top_edge"].to_numpy()
    curve = []
    for threshold in THRESHOLDS:
        forwarded = top < threshold
        accuracy = np.where(forwarded, cloud_correct, edge_correct).mean()
        curve.append({"threshold": float(threshold), "accuracy": float(accuracy), "forwarded": float(forwarded.mean())})
    cloud_accuracy = float(cloud_correct.mean())
    good = [point for point in curve if point["accuracy"] >= cloud_accuracy - tolerance]
    return {"task": task, "samples": len(joined), "edge_accuracy": float(edge_correct.mean()),
            "cloud_accuracy": cloud_accuracy, "tolerance": tolerance, "recommended": good[0], "curve": curve}
