"""Hyperparameter search on Ray Tune: real trials (each a Ray Train + DeepSpeed run) on the
mini corpus, ASHA, grid / random / bayes, a killed driver continued, MLflow records."""

import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from tessera.core.engine import execute
from tessera.core.lease import DEFAULT_LEASE
from tessera.core.storage import Store
from tessera.train.layout import METRICS, STOP_REQUESTED, WEIGHTS
from tessera.train.stage import run_train_stage
from tessera.train.tasks import epoch_metrics
from tessera.train.tune import BEST, TRIALS_TABLE, TuneStage
from tessera.workflows.config import TesseraConfig, load_config
from tests.conftest import REPO, TESSERA, free_port

TRAIN = {"epochs": 3, "micro_batch_size": 8, "warmup_steps": 1, "val_fraction": 0.3, "loader_workers": 0,
         "checkpoint_every": 1000, "model": {"modalities": ["text", "image"], "hidden": 32}}
# two trials at once on the session's 2 CPUs (a trial of one worker trains in its own actor)
RESOURCES = {"workers": 1, "cpus_per_worker": 0.9}


def config_file(tmp_path, **sections) -> str:
    path = tmp_path / "tune.yaml"
    path.write_text(json.dumps({"train": TRAIN} | sections))
    return str(path)


def tuned(shards, folder, cfg: TesseraConfig):
    stage = TuneStage(Store(str(shards)), Store(str(folder)), cfg.train, cfg.tune, cfg.runtime.lease,
                      cfg.model_dump(mode="json"), cfg.tracking)
    return execute(stage, DEFAULT_LEASE, progress=False)


def last_val_loss(run) -> float:
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    return [epoch_metrics(r) for r in records if "val_tasks" in r][-1]["val.loss"]


@pytest.mark.slow
def test_a_random_search_with_asha_records_its_trials_and_its_best_config_trains_the_same(
        embedded_mini, ray_session, tmp_path):
    import mlflow

    mlruns = tmp_path / "mlruns"
    cfg = load_config(config_file(tmp_path, tune={
        "space": {"train.lr": {"loguniform": [1e-4, 3e-2]}, "train.model.dropout": {"uniform": [0.0, 0.3]}},
        "trials": 4, "max_concurrent": 2, "metric": "val.loss", "mode": "min", "resources_per_trial": RESOURCES},
        tracking={"mlflow_uri": mlruns.as_uri(), "experiment": "search"}))
    folder = tmp_path / "tune"
    summary = tuned(embedded_mini, folder, cfg)

    rows = pq.read_table(folder / TRIALS_TABLE).to_pylist()
    assert len(rows) == summary.trials == 4 and summary.failed == 0
    for row in rows:
        settings, run = json.loads(row["settings"]), folder / "trials" / row["trial"]
        assert set(settings) == {"train.lr", "train.model.dropout"} and 1e-4 <= settings["train.lr"] <= 3e-2
        # a completed trial trained all its epochs and exported; one ASHA stopped did neither
        assert (row["status"] == "completed") == (row["epochs"] == 3) == (run / WEIGHTS).exists(), row
        assert row["status"] in ("completed", "stopped") and row["last"] == last_val_loss(run)
        assert not (run / STOP_REQUESTED).exists() or row["status"] == "stopped"
    completed = [r for r in rows if r["status"] == "completed"]
    assert summary.best_value == min(r["last"] for r in completed) and summary.completed == len(completed)
    # the trials' actors (reused from trial to trial, then killed: asynchronously) gave their CPUs back
    deadline = time.monotonic() + 10
    while ray_session.available_resources().get("CPU", 0) < 1.95 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_session.available_resources().get("CPU", 0) == pytest.approx(2.0, abs=0.05)

    # best.yaml is a whole config that trains the best trial again, to the same figure
    best = load_config(folder / BEST)
    assert {"train.lr": best.train.lr, "train.model.dropout": best.train.model.dropout} == summary.best_settings
    again = tmp_path / "again"
    run_train_stage(Store(str(embedded_mini)), Store(str(again)), best.train)
    assert last_val_loss(again) == pytest.approx(summary.best_value, rel=1e-6)

    # MLflow: the search, and one run per trial nested under it with its params and metrics
    mlflow.set_tracking_uri(mlruns.as_uri())
    runs = mlflow.search_runs(experiment_names=["search"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    trials = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert len(parent) == 1 and len(trials) == 4
    assert set(trials["tags.tessera.trial"]) == {r["trial"] for r in rows}
    assert trials["params.lr"].notna().all() and trials["metrics.val.loss"].notna().all()
    assert set(trials["status"]) <= {"FINISHED", "KILLED"}
    assert parent["metrics.best.val.loss"].iloc[0] == pytest.approx(summary.best_value)


def tune_command(shards, folder, config: str) -> list[str]:
    return [*TESSERA, "tune", str(shards), "--run-dir", str(folder), "--config", config, "--no-progress",
            "--workers", "2"]


@pytest.mark.slow
def test_a_grid_runs_each_point_once_and_a_killed_driver_continues_without_rerunning_finished_trials(
        embedded_mini, tmp_path):
    config = config_file(tmp_path, tune={"space": {"train.lr": {"grid": [1e-3, 3e-3, 1e-2]}}, "search": "grid",
                                         "scheduler": "none", "max_concurrent": 1, "resources_per_trial": RESOURCES})
    folder = tmp_path / "tune"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(tune_command(embedded_mini, folder, config), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # (a bound, not a timing)
    # killed once the second trial has started (one at a time: the first is done)
    while len(list(folder.glob("trials/*/train-config.json"))) < 2 and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    outputs = ("train-summary.json", METRICS, WEIGHTS)
    finished = {path.parent: [(path.parent / name).read_bytes() for name in outputs]
                for path in folder.glob("trials/*/train-summary.json")}
    assert 1 <= len(finished) < 3 and not (folder / TRIALS_TABLE).exists()

    done = subprocess.run(tune_command(embedded_mini, folder, config), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(folder / TRIALS_TABLE).to_pylist()
    assert sorted(json.loads(r["settings"])["train.lr"] for r in rows) == [1e-3, 3e-3, 1e-2]
    assert all(r["status"] == "completed" and r["epochs"] == 3 for r in rows)
    # a trial finished before the kill was not trained again
    assert all([(run / name).read_bytes() for name in outputs] == before for run, before in finished.items())
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["trials"] == 3 and record["best_config"].endswith(BEST)
    other = subprocess.run([*tune_command(embedded_mini, folder, config), "--set", "tune.space={train.lr: {grid: "
                            "[0.1]}}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode == 3 and "another config" in other.stderr, other.stderr[-2000:]
    page = (folder / "report.html").read_text()  # the trials table, each trial's epochs, settings vs metric
    assert page.count("<tr><td>") == 3 and all(r["trial"] in page for r in rows) and page.count("<img") == 2


@pytest.mark.slow
def test_a_bayes_search_completes_with_its_tracking_server_down(embedded_mini, ray_session, tmp_path, caplog):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = load_config(config_file(tmp_path, train=TRAIN | {"epochs": 1}, tune={
        "space": {"train.lr": {"loguniform": [1e-4, 3e-2]}, "train.weight_decay": {"choice": [0.0, 0.01]}},
        "search": "bayes", "scheduler": "none", "trials": 2, "max_concurrent": 1, "resources_per_trial": RESOURCES},
        tracking={"mlflow_uri": down}))
    summary = tuned(embedded_mini, tmp_path / "tune", cfg)
    rows = pq.read_table(tmp_path / "tune" / TRIALS_TABLE).to_pylist()
    assert summary.trials == summary.completed == len(rows) == 2
    assert len({r["settings"] for r in rows}) == 2 and summary.best_config
    assert any("could not be reached" in r.message for r in caplog.records if r.name == "tessera.train.tracking")


@pytest.mark.slow
def test_asha_stops_a_cross_validated_trial_on_its_folds_mean(embedded_mini, ray_session, tmp_path):
    """Cross-validated trials (2 folds each, on Ray Train) report their folds' mean every epoch,
    so ASHA can stop one mid-way: a learning rate that barely moves is stopped after a rung (a
    few epochs later: the trials train on while Tune decides), each fold still training on
    request, and its row has the epochs both folds trained."""
    epochs = 40
    cfg = load_config(config_file(tmp_path, train=TRAIN | {"cross_validation": {"folds": 2}, "epochs": epochs}, tune={
        "space": {"train.lr": {"grid": [3e-2, 1e-6]}}, "search": "grid", "scheduler": "asha", "max_concurrent": 1,
        "metric": "val.loss", "mode": "min", "resources_per_trial": RESOURCES}))
    summary = tuned(embedded_mini, tmp_path / "tune", cfg)
    table = pq.read_table(tmp_path / "tune" / TRIALS_TABLE).to_pylist()
    rows = {json.loads(r["settings"])["train.lr"]: r for r in table}
    assert (rows[3e-2]["status"], rows[3e-2]["epochs"]) == ("completed", epochs)
    assert summary.best_settings == {"train.lr": 3e-2}
    assert rows[1e-6]["status"] == "stopped" and 1 <= rows[1e-6]["epochs"] < epochs
    trained, stopped = [], []
    for fold in (0, 1):  # each fold still training when asked stopped on request (one may have finished first)
        run = tmp_path / "tune" / "trials" / rows[1e-6]["trial"] / "folds" / str(fold)
        records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
        trained.append(sum("val_tasks" in r for r in records))
        stopped.append(bool(records[-1].get("stopped")))
        assert (stopped[-1] or trained[-1] == epochs) and not (run / STOP_REQUESTED).exists()
    assert any(stopped) and min(trained) == rows[1e-6]["epochs"]  # (the epochs both folds reached: what it reported)
    completed = tmp_path / "tune" / "trials" / rows[3e-2]["trial"]
    assert json.loads((completed / "cv.json").read_text())["folds"] == 2


@pytest.mark.parametrize("setting, named", [
    ("tune.space={train.model.dropout: {uniform: [0.1, 1.5]}}", "train.model.dropout = 1.5"),
    ("tune.space={train.learning_rate: {choice: [0.1]}}", "train.learning_rate is not a training setting"),
    ("tune.space={train.lr: {loguniform: [0, 1]}}", "loguniform: both ends must be above 0"),
    ("tune.space={train.lr: {grid: [0.1, 0.2]}}", "a grid entry needs search: grid"),
    ("tune.metric=val.nope.accuracy", "tune.metric val.nope.accuracy"),
])
def test_a_bad_search_is_exit_2_naming_it_before_ray_starts(tmp_path, setting, named):
    space = [] if setting.startswith("tune.space") else ["--set", "tune.space={train.lr: {choice: [0.1]}}"]
    done = subprocess.run([*TESSERA, "tune", str(tmp_path / "shards"), "--run-dir", str(tmp_path / "tune"),
                           "--set", setting, *space], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert "started a local Ray" not in done.stderr and not (tmp_path / "tune").exists()
