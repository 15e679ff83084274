"""Choosing a hybrid deployment's threshold: the edge-cloud cascade's accuracy and share
forwarded per threshold, by hand, then through `tessera evaluate RUN --cascade CLOUD_RUN`."""

import json
import shutil

import pyarrow as pa
import pytest

from tessera.core.errors import NotAnInput
from tessera.train.cascade import cascade_curve
from tessera.workflows.cli import main


def predictions(rows: list[tuple[str, str, str, list[float]]]) -> pa.Table:
    """(key, target, predicted, scores) rows of a validation set's `label` task."""
    return pa.table({"set": ["val"] * len(rows), "key": [r[0] for r in rows], "task": ["label"] * len(rows),
                     "target": [r[1] for r in rows], "predicted": [r[2] for r in rows],
                     "scores": [r[3] for r in rows]})


# the edge is right on a and c (sure: 0.9, 0.7), wrong on b and d (unsure: 0.6, 0.55); the cloud is right on all
EDGE = predictions([("a", "x", "x", [0.9, 0.1]), ("b", "x", "y", [0.4, 0.6]), ("c", "y", "y", [0.3, 0.7]),
                    ("d", "y", "x", [0.55, 0.45])])
CLOUD = predictions([("a", "x", "x", [0.9, 0.1]), ("b", "x", "x", [0.8, 0.2]), ("c", "y", "y", [0.1, 0.9]),
                     ("d", "y", "y", [0.2, 0.8]), ("e", "y", "y", [0.2, 0.8])])


def test_the_cascade_of_a_hand_worked_example():
    result = cascade_curve(EDGE, CLOUD, "label", tolerance=0.0)
    assert result["samples"] == 4  # the keys both were evaluated on
    assert (result["edge_accuracy"], result["cloud_accuracy"]) == (0.5, 1.0)
    at = {p["threshold"]: (p["accuracy"], p["forwarded"]) for p in result["curve"]}
    assert at[0.0] == at[0.55] == (0.5, 0.0)  # nothing under the bound: the edge alone
    assert at[0.56] == (0.75, 0.25)  # d (0.55) goes on and the cloud gets it right
    assert at[0.61] == (1.0, 0.5)  # b (0.6) too
    assert at[1.0] == (1.0, 1.0)
    assert result["recommended"] == {"threshold": 0.61, "accuracy": 1.0, "forwarded": 0.5}
    # a tolerance of a quarter: the lowest threshold within it forwards only d
    assert cascade_curve(EDGE, CLOUD, "label", tolerance=0.25)["recommended"]["threshold"] == 0.56


def test_runs_with_no_validation_sample_in_common_have_no_cascade():
    other = predictions([("z", "x", "x", [0.9, 0.1])])
    with pytest.raises(NotAnInput, match="no validation sample"):
        cascade_curve(EDGE, other, "label", tolerance=0.01)


def test_evaluate_cascade_writes_the_curve_and_the_recommended_threshold(trained_mini, tmp_path, capsys):
    """The same model as edge and cloud (a copy of the run): the cascade never needs the cloud."""
    edge = tmp_path / "edge"
    shutil.copytree(trained_mini, edge, ignore=shutil.ignore_patterns("lease.json*", "logs"))
    code = main(["evaluate", str(edge), "--cascade", str(trained_mini), "--tolerance", "0.0", "--json",
                 "--no-progress"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cascade = json.loads((edge / "eval.json").read_text())["cascade"]
    assert cascade["cloud"] == str(trained_mini) and cascade["task"] == "label"
    assert cascade["edge_accuracy"] == cascade["cloud_accuracy"] and len(cascade["curve"]) == 101
    assert cascade["recommended"] == {"threshold": 0.0, "accuracy": cascade["cloud_accuracy"], "forwarded": 0.0}
    assert record["cascade"]["recommended"] == cascade["recommended"]
    assert (trained_mini / "eval-predictions.parquet").exists()  # the cloud run was evaluated too
    assert "cascade: accuracy vs share forwarded" in (edge / "report.html").read_text()
