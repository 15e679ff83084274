"""MLflow records of a run folder, on a local file store (no server), read back with MLflow's own API."""

import json

import pytest

from tessera.core.storage import Store
from tessera.train.config import TrackingConfig, TrainConfig
from tessera.train.layout import META, METRICS
from tessera.train.tracking import flattened, numbers, record_results, record_training

VALIDATION = {"val_loss": 0.9, "val_accuracy": 0.5, "val_samples": 4,
              "val_tasks": {"label": {"loss": 0.9, "samples": 4, "accuracy": 0.5, "chance": 0.25}}}


@pytest.fixture
def run(tmp_path) -> Store:
    """A run folder as training leaves it: per-step losses, an epoch's validation, model.json."""
    folder = Store(str(tmp_path / "run"))
    records = [{"step": s, "epoch": 0, "loss": 2.0 / s} for s in (1, 2, 3)] + [{"epoch": 0, "step": 3, **VALIDATION}]
    folder.write_bytes(METRICS, "".join(json.dumps(r) + "\n" for r in records).encode())
    folder.write_bytes(META, b'{"dims": {"text": 384}}')
    return folder


def test_a_training_and_its_evaluation_are_one_mlflow_run(run, tmp_path):
    import mlflow

    tracking = TrackingConfig(mlflow_uri=(tmp_path / "mlruns").as_uri(), experiment="runs")
    record_training(tracking, run, TrainConfig(lr=0.01).model_dump(mode="json"), {"tessera.trial": "t1"}, "FINISHED")
    evaluation = {"val": {"samples": 4, "tasks": {"label": {"accuracy": 0.5, "macro_f1": 0.4}}, "curve": [1, 2]}}
    record_results(tracking, run, numbers(evaluation, "eval"), {"eval.json": json.dumps(evaluation).encode()})

    mlflow.set_tracking_uri(tracking.mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["runs"])
    assert len(runs) == 1  # the evaluation went into the training's run
    row = runs.iloc[0]
    assert row["status"] == "FINISHED" and row["tags.tessera.run"] == run.url and row["tags.tessera.trial"] == "t1"
    assert row["params.lr"] == "0.01" and row["params.model.hidden"] == "128"
    assert row["metrics.val.loss"] == 0.9 and row["metrics.val.label.accuracy"] == 0.5
    assert row["metrics.eval.val.tasks.label.macro_f1"] == 0.4 and "metrics.eval.val.curve" not in runs
    client = mlflow.tracking.MlflowClient()
    assert [m.value for m in client.get_metric_history(row["run_id"], "loss")] == [2.0, 1.0, 2.0 / 3]
    assert {f.path for f in client.list_artifacts(row["run_id"])} == {"model.json", "eval.json"}


def test_an_unreachable_server_costs_a_warning_and_nothing_else(run, caplog):
    down = TrackingConfig(mlflow_uri="http://127.0.0.1:9")  # the discard port: nothing answers
    record_training(down, run, {}, {}, "FINISHED")
    record_results(down, run, {"eval.x": 1.0}, {})
    warnings = [r.message for r in caplog.records if r.name == "tessera.train.tracking"]
    assert len(warnings) == 2 and all("could not be reached" in w for w in warnings)


def test_a_config_is_flattened_to_dotted_params():
    assert dict(flattened({"lr": 0.1, "model": {"hidden": 8, "modalities": ["text"]}, "name": "x", "no": None})) == {
        "lr": "0.1", "model.hidden": "8", "model.modalities": '["text"]', "name": "x", "no": "null"}
