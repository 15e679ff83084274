"""Experiment records in MLflow (`tracking.mlflow_uri`): each training run, tune trial included,
becomes an MLflow run once it ends — its flattened config as params, its per-step losses and
validation metrics from metrics.jsonl, tags saying what it trained on, and model.json — logged
from the driver. A trial's run is nested under its search's parent run. A tracking server that
cannot be reached costs a few retries and a warning, never the training: the run folder is the
record of truth and MLflow a copy of it."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from importlib.metadata import version

import tenacity

from tessera.core.storage import Store
from tessera.train.config import TrackingConfig
from tessera.train.layout import META, METRICS
from tessera.train.tasks import epoch_metrics

log = logging.getLogger(__name__)

ATTEMPTS = 3
PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests a run under another
BATCH = 1000  # metrics per log_batch call (MLflow's limit)
PARAM_CHARS = 6000  # MLflow's limit on a param's value


def flattened(tree: dict, prefix: str = "") -> Iterator[tuple[str, str]]:
    """A config tree as (dotted key, value) params."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from flattened(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", json.dumps(value)[:PARAM_CHARS] if not isinstance(value, str) else value


def step_metrics(records: list[dict]) -> Iterator[tuple[str, float, int]]:
    """(name, value, step) of metrics.jsonl: each step's loss, each epoch's validation figures
    under tune.metric's names (val.loss, val.<task>.<metric>)."""
    for record in records:
        if record.get("loss") is not None:
            yield "loss", float(record["loss"]), record["step"]
        if "val_tasks" in record:
            for name, value in epoch_metrics(record).items():
                yield name, value, record["step"]


def _client(cfg: TrackingConfig):
    # MLflow's own HTTP retries last minutes by default: a few, and ours around them
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if cfg.mlflow_uri.startswith("file:"):  # (asked for by name: MLflow would refuse it as deprecated)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.mlflow_uri)


def _experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def _retried(call, *args, **kwargs):
    return tenacity.Retrying(stop=tenacity.stop_after_attempt(ATTEMPTS), wait=tenacity.wait_exponential(max=4),
                             reraise=True)(call, *args, **kwargs)


def start_parent(cfg: TrackingConfig, name: str, params: dict, tags: dict[str, str]) -> str | None:
    """An MLflow run for a search (its trials nest under it); its id, or None when tracking is
    off or unreachable (a warning)."""
    if not cfg.mlflow_uri:
        return None
    try:
        client = _client(cfg)
        run = _retried(client.create_run, _retried(_experiment, client, cfg.experiment), run_name=name,
                       tags=tags | {"tessera.version": version("tessera")})
        _log_params(client, run.info.run_id, params)
        return run.info.run_id
    except Exception as e:
        log.warning("MLflow at %s could not be reached (%s): the search is not recorded there", cfg.mlflow_uri, e)
        return None


def end_parent(cfg: TrackingConfig, run_id: str | None, metrics: dict[str, float], failed: bool = False) -> None:
    if run_id is None:
        return
    from mlflow.entities import Metric

    try:
        client = _client(cfg)
        now = int(time.time() * 1000)
        _retried(client.log_batch, run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        _retried(client.set_terminated, run_id, "FAILED" if failed else "FINISHED")
    except Exception as e:
        log.warning("MLflow at %s could not be reached (%s): the search's results are not recorded there",
                    cfg.mlflow_uri, e)


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flattened(params)]
    for start in range(0, len(items), 100):  # (MLflow's limit per call)
        _retried(client.log_batch, run_id, params=items[start:start + 100])


def record_training(cfg: TrackingConfig, run: Store, config: dict, tags: dict[str, str], status: str) -> None:
    """RUN's training as an MLflow run (STATUS: FINISHED, KILLED, FAILED): CONFIG's flattened
    params, metrics.jsonl's metrics, TAGS (a parent run's id nests it), model.json."""
    if not cfg.mlflow_uri:
        return
    from mlflow.entities import Metric

    try:
        records = [json.loads(line) for line in run.read_bytes(METRICS).decode().splitlines()] \
            if run.exists(METRICS) else []
        client = _client(cfg)
        created = _retried(client.create_run, _retried(_experiment, client, cfg.experiment),
                           run_name=run.url.rstrip("/").rsplit("/", 1)[-1],
                           tags=tags | {"tessera.run": run.url, "tessera.version": version("tessera")})
        run_id, now = created.info.run_id, int(time.time() * 1000)
        _log_params(client, run_id, config)
        metrics = [Metric(name, value, now, step) for name, value, step in step_metrics(records)]
        for start in range(0, len(metrics), BATCH):
            _retried(client.log_batch, run_id, metrics=metrics[start:start + BATCH])
        if run.exists(META):
            _retried(client.log_text, run_id, run.read_bytes(META).decode(), META)
        _retried(client.set_terminated, run_id, status)
        log.info("recorded %s in MLflow (%s, run %s)", run.url, cfg.mlflow_uri, run_id)
    except Exception as e:
        log.warning("MLflow at %s could not be reached (%s): %s is not recorded there (its folder holds it all)",
                    cfg.mlflow_uri, e, run.url)


MAX_RESULT_METRICS = 500  # numbers of an eval.json / export.json logged (its curves are files, not metrics)


def numbers(tree: dict, prefix: str) -> dict[str, float]:
    """The numeric leaves of a summary (lists left out) as dotted metric names."""
    found = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            found |= numbers(value, name)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found[name] = float(value)
    return dict(list(found.items())[:MAX_RESULT_METRICS])


def record_results(cfg: TrackingConfig, run: Store, metrics: dict[str, float], files: dict[str, bytes]) -> None:
    """An evaluation's or export's figures and files added to RUN's MLflow run (the one its
    training made, found by its tessera.run tag; a new one when there is none)."""
    if not cfg.mlflow_uri:
        return
    from mlflow.entities import Metric

    try:
        client = _client(cfg)
        experiment = _retried(_experiment, client, cfg.experiment)
        found = _retried(client.search_runs, [experiment], filter_string=f"tags.`tessera.run` = '{run.url}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
        run_id = found[0].info.run_id if found else _retried(
            client.create_run, experiment, run_name=run.url.rstrip("/").rsplit("/", 1)[-1],
            tags={"tessera.run": run.url, "tessera.version": version("tessera")}).info.run_id
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, 0) for k, v in metrics.items()]
        for start in range(0, len(items), BATCH):
            _retried(client.log_batch, run_id, metrics=items[start:start + BATCH])
        for name, data in files.items():
            _retried(client.log_text, run_id, data.decode(), name)
        if not found:
            _retried(client.set_terminated, run_id, "FINISHED")
    except Exception as e:
        log.warning("MLflow at %s could not be reached (%s): the results of %s are not recorded there",
                    cfg.mlflow_uri, e, run.url)
