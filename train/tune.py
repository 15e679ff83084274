"""Hyperparameter search on Ray Tune (`tessera tune`, `TuneStage`).

    TUNE_DIR/experiment/        Ray Tune's experiment state (through the store: a driver started
                                again continues it, finished trials are not run again)
    TUNE_DIR/trials/<name>/     each trial's training run (its name: a digest of its settings, so
                                that settings drawn twice train once): the same TrainStage as
                                `tessera train` (Ray Train, DeepSpeed, loaders, checkpoints, lease)
    TUNE_DIR/trials.parquet     one row per trial: its settings, best and last metric, epochs...
    TUNE_DIR/best.yaml          the whole config with the best trial's settings
                                (`tessera train --config TUNE_DIR/best.yaml` trains it again)
    TUNE_DIR/tune-config.json   the search's config (another one in this folder is refused)
    TUNE_DIR/tune-summary.json  what the search did

A trial reports its validation records (rank 0's metrics.jsonl, read through the store) to Tune
epoch by epoch, so ASHA can stop the worse ones: a stopped trial asks its training to stop at the
next epoch's end (RUN/stop-requested) and waits, so that its workers' placement group is given
back (a Ray Train controller killed with its trial would keep it until the driver ends). A trial
lost mid-way is a training run like any other: started again, it resumes from its checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import yaml

from tessera.core.engine import Stage, StageRun
from tessera.core.errors import ConfigError, OutputConflict, StoppedOnRequest
from tessera.core.lease import LeaseConfig
from tessera.core.storage import Store
from tessera.core.summary import StageSummary
from tessera.train.config import NO_TRACKING, TrackingConfig, TrainConfig, TuneConfig, with_settings
from tessera.train.crossval import training_folders, validation_so_far
from tessera.train.layout import STOP_REQUESTED, TRAIN_SUMMARY
from tessera.train.tasks import VALIDATION_METRIC, epoch_metrics
from tessera.train.tracking import PARENT_TAG, end_parent, start_parent

log = logging.getLogger(__name__)

EXPERIMENT, NAME = "experiment", "tune"
TRIALS = "trials"
TRIALS_TABLE = "trials.parquet"
BEST = "best.yaml"
TUNE_SUMMARY = "tune-summary.json"
TUNE_CONFIG = "tune-config.json"  # what the folder's experiment searches: a search of another is refused
POLL_S = 1.0  # how often a trial looks for a new validation record
TRIAL_ACTOR_CPUS = 0.01  # (Tune refuses a trial of no resources at all)

TRIAL_SCHEMA = pa.schema([
    ("trial", pa.string()),
    ("settings", pa.string()),  # JSON: space key -> value
    ("status", pa.string()),  # completed | stopped (by the scheduler) | failed
    ("best", pa.float64()),  # the metric's best value over the trial's epochs
    ("last", pa.float64()),
    ("epochs", pa.int32()),  # validated epochs
    ("stopped_early", pa.bool_()),
    ("seconds", pa.float64()),
    ("run", pa.string()),  # the trial's run folder
    ("error", pa.string()),
])


@dataclass(frozen=True)
class TuneSummary(StageSummary):
    """tune-summary.json."""

    FILE = TUNE_SUMMARY

    config_digest: str = ""
    search: str = ""
    scheduler: str = ""
    metric: str = ""
    mode: str = ""
    trials: int = 0
    completed: int = 0
    stopped_early: int = 0
    failed: int = 0
    trial_epochs: int = 0  # epochs trained over all trials
    best_trial: str | None = None
    best_value: float | None = None
    best_settings: dict | None = None
    best_run: str | None = None
    best_config: str | None = None  # the URL of best.yaml


def check_metric(tune: TuneConfig, train: TrainConfig) -> None:
    """tune.metric names what a trial's validation records hold (ConfigError before Ray starts)."""
    parts = tune.metric.split(".")
    if len(parts) == 2:
        return
    tasks = [t.name for t in train.tasks] or ["label"]
    names = {"loss", "samples", *VALIDATION_METRIC.values()}
    if parts[1] not in tasks or parts[2] not in names:
        raise ConfigError(f"tune.metric {tune.metric}: a trial reports val.loss, val.accuracy and "
                          f"val.<task>.<{'|'.join(sorted(names))}> for the tasks {', '.join(tasks)}")


def trial_name(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def trial_config(train: TrainConfig, tune: TuneConfig, settings: dict) -> TrainConfig:
    """The training config of the trial given SETTINGS (space keys -> values)."""
    resources = tune.resources_per_trial
    return with_settings(train, {k.removeprefix("train."): v for k, v in settings.items()}
                         | {"workers": resources.workers, "cpus_per_worker": resources.cpus_per_worker})


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares (shipped once to the trial actors)."""

    shards: Store | tuple[Store, ...]
    folder: Store  # TUNE_DIR
    train: TrainConfig
    tune: TuneConfig
    lease: LeaseConfig
    tracking: TrackingConfig
    parent_run: str | None  # the search's MLflow run: each trial's nests under it


def trial_class():
    """Ray Tune's class trainable of a trial (made here: Ray Tune is imported only when tuning)."""
    from ray import tune as ray_tune

    from tessera.train.stage import run_train_stage

    class Trial(ray_tune.Trainable):
        """Trains in TUNE_DIR/trials/<name>/ in a thread; each `step` is one validation record as
        it reaches the store. Stopped by the scheduler, it asks its training to stop at the next
        epoch's end and waits for it (its Ray Train workers then give back their CPUs). A trial
        of one worker trains in this actor, which Tune then reuses for the next trial (torch,
        DeepSpeed and the process group are set up once per actor, not per trial)."""

        def setup(self, settings: dict, context: TrialContext) -> None:
            self.context = context
            self._start(settings)

        def reset_config(self, new_config: dict) -> bool:
            self._stop()  # (a trial the scheduler stopped hands its actor over without a cleanup)
            self._start(new_config)
            return True

        def _start(self, settings: dict) -> None:
            context = self.context
            name = trial_name(settings)
            self.run = context.folder.child(TRIALS, name)
            cfg = trial_config(context.train, context.tune, settings)
            tags = {"tessera.trial": name} | ({PARENT_TAG: context.parent_run} if context.parent_run else {})
            self.failure: list[BaseException] = []
            self.reported, self.last = 0, {}
            self.folds = cfg.cross_validation.folds  # (a cross-validated trial reports its folds' mean per epoch)

            def train() -> None:
                try:
                    run_train_stage(context.shards, self.run, cfg, context.lease, context.tracking, tags,
                                    in_process=in_process(cfg))
                except StoppedOnRequest:
                    pass
                except BaseException as e:  # raised again by `step`
                    self.failure.append(e)

            self.training = threading.Thread(target=train, name="trial-training")
            self.training.start()

        def step(self) -> dict:
            while True:
                finished = not self.training.is_alive()
                records = validation_so_far(self.run, self.folds)
                if len(records) > self.reported:
                    self.reported += 1
                    self.last = epoch_metrics(records[self.reported - 1])
                    return self.last
                if finished:
                    if self.failure:
                        raise self.failure[0]
                    return {**self.last, "done": True}
                self.training.join(POLL_S)

        def save_checkpoint(self, checkpoint_dir: str) -> dict:
            return {}  # (the training's own checkpoints are in its run folder: it resumes from those)

        def load_checkpoint(self, checkpoint: dict) -> None:
            pass

        def cleanup(self) -> None:
            self._stop()

        def _stop(self) -> None:
            if self.training.is_alive():
                folders = training_folders(self.run, self.folds)
                for folder in folders:
                    folder.write_bytes(STOP_REQUESTED, b"")
                self.training.join()
                for folder in folders:
                    if folder.exists(STOP_REQUESTED):  # (asked too late to matter: that training finished)
                        folder.remove(STOP_REQUESTED)

    return Trial


def trial_validation(folder: Store, settings: dict) -> list[dict]:
    """The validation records so far of the trial of SETTINGS in the tune folder FOLDER (a
    cross-validated trial's: its folds' mean per epoch)."""
    recorded = folder.read_json(TUNE_CONFIG)
    train, tune = TrainConfig.model_validate(recorded["train"]), TuneConfig.model_validate(recorded["tune"])
    return validation_so_far(folder.child(TRIALS, trial_name(settings)),
                             trial_config(train, tune, settings).cross_validation.folds)


def in_process(cfg: TrainConfig) -> bool:
    """Whether a trial trains in its own actor: one worker, no folds (those run on Ray Train)."""
    return cfg.workers == 1 and not cfg.cross_validation.folds


def search_space(tune: TuneConfig) -> dict:
    from ray import tune as ray_tune

    domains = {"choice": ray_tune.choice, "grid": ray_tune.grid_search, "uniform": lambda r: ray_tune.uniform(*r),
               "loguniform": lambda r: ray_tune.loguniform(*r), "randint": lambda r: ray_tune.randint(*r)}
    return {key: domains[d.kind](list(getattr(d, d.kind))) for key, d in tune.space.items()}


def searcher(tune: TuneConfig, seed: int):
    """Grid and random: Tune's variant generator (seeded); bayes: Optuna's TPE (seeded), at
    most max_concurrent trials in flight."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if tune.search != "bayes":
        return BasicVariantGenerator(random_state=seed, max_concurrent=tune.max_concurrent)
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=seed)), max_concurrent=tune.max_concurrent)


def scheduler(tune: TuneConfig, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tune.scheduler == "none" or epochs <= tune.grace_epochs:
        return FIFOScheduler()
    # (max_t past the last epoch: ASHA never stops a trial for reaching it, while it exports)
    return ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=tune.grace_epochs, reduction_factor=2)


def config_digest(train: TrainConfig, tune: TuneConfig, shards: Store | Sequence[Store]) -> str:
    folders = [s.url for s in ([shards] if isinstance(shards, Store) else shards)]
    text = json.dumps([train.model_dump(mode="json"), tune.model_dump(mode="json"), folders], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TuneStage(Stage[TuneSummary]):
    """A search over TUNE.space on SHARDS into the tune folder; FULL_CONFIG (the whole config
    tree, as a mapping) is what best.yaml is written from."""

    command = "tessera tune"

    def __init__(self, shards: Store | Sequence[Store], folder: Store, train: TrainConfig, tune: TuneConfig,
                 lease: LeaseConfig, full_config: dict, tracking: TrackingConfig = NO_TRACKING):
        if not train.val_fraction and not train.cross_validation.folds:
            raise ConfigError("tessera tune compares trials on their validation split: train.val_fraction must be "
                              "above 0 (or train.cross_validation.folds set)")
        if not tune.space:
            raise ConfigError("tessera tune needs tune.space: the train settings to search, e.g. "
                              "train.lr: {loguniform: [1e-4, 1e-2]}")
        check_metric(tune, train)
        self.shards, self.folder, self.train, self.tune = shards, folder, train, tune
        self.lease, self.full_config, self.tracking = lease, full_config, tracking
        self.digest = config_digest(train, tune, shards)

    def current(self) -> TuneSummary | None:
        """The folder's summary when it searched this config; OutputConflict when it holds
        another search (its experiment would be continued with the other's space)."""
        if self.folder.exists(TUNE_CONFIG) and self.folder.read_json(TUNE_CONFIG)["digest"] != self.digest:
            raise OutputConflict(f"{self.folder.url} holds a search of another config or data: use a new folder")
        if TuneSummary.exists(self.folder):
            summary = TuneSummary.read(self.folder)
            if summary.config_digest == self.digest:
                return summary
        return None

    def run(self, run: StageRun) -> TuneSummary:
        # Tune's reporter at verbosity 0 prints nothing (its newer one draws tables regardless)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        import ray
        from ray import tune as ray_tune

        train, tune = self.train, self.tune
        self.folder.write_json(TUNE_CONFIG, {"digest": self.digest, "train": train.model_dump(mode="json"),
                                             "tune": tune.model_dump(mode="json")})
        parent = start_parent(self.tracking, self.folder.url.rstrip("/").rsplit("/", 1)[-1],
                              {"tune": tune.model_dump(mode="json"), "train": train.model_dump(mode="json")},
                              {"tessera.tune": self.folder.url})
        # a trial started again by a driver that was itself started again waits out the lease of
        # the trial it replaces (gone with the old driver's actors) instead of failing
        context = TrialContext(self.shards if isinstance(self.shards, Store) else tuple(self.shards), self.folder,
                               train, tune, self.lease.model_copy(update={"wait": True}), self.tracking, parent)
        # a trial actor that trains holds the worker's resources; one that only waits on its Ray
        # Train workers, next to none
        if in_process(trial_config(train, tune, {})):
            gpu = train.use_gpu is True or (train.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
            resources = {"CPU": tune.resources_per_trial.cpus_per_worker, "GPU": 1 if gpu else 0}
        else:
            resources = {"CPU": TRIAL_ACTOR_CPUS}
        trainable = ray_tune.with_resources(ray_tune.with_parameters(trial_class(), context=context), resources)
        filesystem, path = self.folder.arrow_location(EXPERIMENT)
        experiment = f"{path}/{NAME}"
        if ray_tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
            log.info("continuing the experiment in %s", self.folder.url_of(EXPERIMENT))
            tuner = ray_tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=filesystem)
        else:
            grid = tune.search == "grid"
            tuner = ray_tune.Tuner(
                trainable, param_space=search_space(tune),
                tune_config=ray_tune.TuneConfig(
                    metric=tune.metric, mode=tune.mode, num_samples=1 if grid else tune.trials, reuse_actors=True,
                    search_alg=searcher(tune, train.seed), scheduler=scheduler(tune, train.epochs)),
                run_config=ray_tune.RunConfig(name=NAME, storage_path=path, storage_filesystem=filesystem,
                                              verbose=0, failure_config=ray_tune.FailureConfig(max_failures=1)))
        try:
            results = tuner.fit()
        except BaseException:
            end_parent(self.tracking, parent, {}, failed=True)
            raise
        rows = [self._row(result) for result in results]
        self.folder.write_parquet(TRIALS_TABLE, pa.Table.from_pylist(rows, schema=TRIAL_SCHEMA))
        summary = self._summary(rows)
        end_parent(self.tracking, parent, {"trials": summary.trials, "completed": summary.completed,
                                           "trial_epochs": summary.trial_epochs}
                   | ({f"best.{tune.metric}": summary.best_value} if summary.best_value is not None else {}))
        return summary

    def _row(self, result) -> dict:
        """A trial's row, its figures from its run folder (what its training validated, whether
        it finished), not from what Tune was shown of it."""
        tune = self.tune
        settings = {k: result.config[k] for k in tune.space}
        run = self.folder.child(TRIALS, trial_name(settings))
        values = [epoch_metrics(r).get(tune.metric) for r in trial_validation(self.folder, settings)]
        values = [v for v in values if v is not None and not math.isnan(v)]
        status = "completed" if run.exists(TRAIN_SUMMARY) else "failed" if result.error is not None else "stopped"
        return {"trial": trial_name(settings), "settings": json.dumps(settings, sort_keys=True), "status": status,
                "best": (min if tune.mode == "min" else max)(values) if values else None,
                "last": values[-1] if values else None, "epochs": len(values), "stopped_early": status == "stopped",
                "seconds": float((result.metrics or {}).get("time_total_s") or 0.0), "run": run.url,
                "error": None if result.error is None else str(result.error).splitlines()[0][:500]}

    def _summary(self, rows: list[dict]) -> TuneSummary:
        tune = self.tune
        # the best finished training: what best.yaml trains again (a stopped trial's metric is
        # that of a shorter run than the config says)
        candidates = [r for r in rows if r["status"] == "completed" and r["last"] is not None]
        best = (min if tune.mode == "min" else max)(candidates, key=lambda r: r["last"]) if candidates else None
        best_config = None
        if best:
            settings = json.loads(best["settings"])
            trained = trial_config(self.train, tune, settings)
            tree = {k: v for k, v in self.full_config.items() if k != "tune"} | {"train": trained.model_dump(
                mode="json")}
            self.folder.write_bytes(BEST, yaml.safe_dump(tree, sort_keys=False).encode())
            best_config = self.folder.url_of(BEST)
        return TuneSummary(
            config_digest=self.digest, search=tune.search, scheduler=tune.scheduler, metric=tune.metric,
            mode=tune.mode, trials=len(rows), completed=sum(r["status"] == "completed" for r in rows),
            stopped_early=sum(r["stopped_early"] for r in rows), failed=sum(r["status"] == "failed" for r in rows),
            trial_epochs=sum(r["epochs"] for r in rows), best_trial=best["trial"] if best else None,
            best_value=best["last"] if best else None,
            best_settings=json.loads(best["settings"]) if best else None, best_run=best["run"] if best else None,
            best_config=best_config)
