"""Cross-validation (`train.cross_validation.folds: k`): k training runs in RUN/folds/<i>/, fold
i validating on the keys whose hash bucket lies in [i/k, (i+1)/k) — disjoint folds that cover
every key, the same in every run — as many at once as the cluster's CPUs hold. Then RUN/cv.json
(each fold's last validation figures, their mean and standard deviation) and RUN/metrics.jsonl:
the folds' validation records averaged epoch by epoch, so that the run's metric — what
`tessera tune` reads — is the cross-validated one."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tessera.core.lease import DEFAULT_LEASE
from tessera.core.storage import Store
from tessera.train.config import TrackingConfig, TrainConfig, with_settings
from tessera.train.layout import METRICS, TrainSummary
from tessera.train.tasks import epoch_metrics

FOLDS = "folds"
CV = "cv.json"


def fold_run(folder: Store, fold: int) -> Store:
    return folder.child(FOLDS, str(fold))


def validation_records(run: Store) -> list[dict]:
    """The validation records of RUN's metrics.jsonl so far (whole lines only: rank 0 may be
    writing the next)."""
    if not run.exists(METRICS):
        return []
    text = run.read_bytes(METRICS).decode()
    return [r for r in (json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()) if "val_tasks" in r]


def validation_so_far(run: Store, folds: int | None) -> list[dict]:
    """RUN's validation records so far: its own, or with FOLDS, its folds' averaged for every
    epoch all of them have reached (what RUN/metrics.jsonl holds once they are done)."""
    if not folds:
        return validation_records(run)
    histories = [validation_records(fold_run(run, fold)) for fold in range(folds)]
    return [mean_record([h[epoch] for h in histories]) for epoch in range(min(map(len, histories)))]


def training_folders(run: Store, folds: int | None) -> list[Store]:
    """The run folders RUN's training writes: its own, and its folds' (where a stop request is
    written for all of them to see)."""
    return [run, *(fold_run(run, fold) for fold in range(folds or 0))]


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def mean_record(records: list[dict]) -> dict:
    """One epoch's validation records, one per fold, as one: each figure the folds' mean (the
    sample counts summed)."""
    tasks = {}
    for task, first in records[0]["val_tasks"].items():
        tasks[task] = {name: sum(r["val_tasks"][task][name] for r in records) if name == "samples"
                       else _mean([r["val_tasks"][task][name] for r in records]) for name in first}
    return {"epoch": records[0]["epoch"], "step": max(r["step"] for r in records),
            "val_loss": _mean([r["val_loss"] for r in records]),
            "val_accuracy": _mean([r["val_accuracy"] for r in records]),
            "val_samples": sum(r["val_samples"] for r in records), "val_tasks": tasks, "folds": len(records)}


def cross_validate(shards: Store | Sequence[Store], folder: Store, cfg: TrainConfig, tracking: TrackingConfig,
                   tags: dict[str, str]) -> TrainSummary:
    """Train the folds (each its own run, lease and checkpoints: an interrupted cross-validation
    resumes fold by fold), then write cv.json and the averaged metrics.jsonl into FOLDER."""
    import ray

    from tessera.train.stage import run_train_stage

    folds = cfg.cross_validation.folds
    at_once = int(ray.cluster_resources().get("CPU", 1) // (cfg.workers * cfg.cpus_per_worker))
    with ThreadPoolExecutor(max(1, min(folds, at_once)), thread_name_prefix="fold") as pool:
        summaries = list(pool.map(
            lambda fold: run_train_stage(shards, fold_run(folder, fold), with_settings(
                cfg, {"cross_validation.fold": fold}), DEFAULT_LEASE, tracking, tags | {"tessera.fold": str(fold)}),
            range(folds)))
    averaged = validation_so_far(folder, folds)
    folder.write_bytes(METRICS, "".join(json.dumps(r) + "\n" for r in averaged).encode())
    last = [epoch_metrics(validation_records(fold_run(folder, fold))[-1]) for fold in range(folds)]
    names = sorted(set.intersection(*(set(m) for m in last)) - {"epoch"})
    folder.write_json(CV, {
        "folds": folds,
        "per_fold": [{"fold": fold, "run": fold_run(folder, fold).url, **last[fold]} for fold in range(folds)],
        "mean": {n: statistics.fmean(m[n] for m in last) for n in names},
        "std": {n: statistics.pstdev(m[n] for m in last) for n in names}})
    final = averaged[-1] if averaged else None
    return TrainSummary(
        train_samples=round(statistics.fmean(s.train_samples for s in summaries)),
        val_samples=sum(s.val_samples for s in summaries), tasks=summaries[0].tasks,
        steps=sum(s.steps for s in summaries), resumed=any(s.resumed for s in summaries),
        first_loss=_mean([s.first_loss for s in summaries]), final_loss=_mean([s.final_loss for s in summaries]),
        val_accuracy=final["val_accuracy"] if final else None, val_tasks=final["val_tasks"] if final else None,
        checkpoint=None, model=folder.url_of(FOLDS), init_from=cfg.init_from, distilled_from=cfg.distill_from)
