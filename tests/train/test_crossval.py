"""Cross-validation: k real trainings (two at a time on the session's 2 CPUs) on disjoint folds
of the keys that cover every key, and the run's figures their mean."""

import json
import statistics

import pytest

from tessera.core.storage import Store
from tessera.train.config import CrossValidationConfig, ModelConfig, TrainConfig
from tessera.train.crossval import CV, fold_run
from tessera.train.data import DatasetInfo, StreamSpec, loader
from tessera.train.layout import METRICS
from tessera.train.stage import run_train_stage

MODALITIES = ("text", "image")


def keys_of(info: DatasetInfo, split: str, val) -> set[str]:
    return {k for batch in loader(StreamSpec(info, split, val, 8, 1, 0, None), 0) for k in batch["keys"]}


@pytest.mark.slow
def test_three_folds_validate_on_disjoint_keys_that_cover_every_key_and_the_run_reports_their_mean(
        embedded_mini, ray_session, tmp_path):
    shards, run = Store(str(embedded_mini)), Store(str(tmp_path / "cv"))
    cfg = TrainConfig(workers=1, cpus_per_worker=0.9, epochs=2, micro_batch_size=8, warmup_steps=1,
                      loader_workers=0, checkpoint_every=1000, model=ModelConfig(modalities=MODALITIES, hidden=32),
                      cross_validation=CrossValidationConfig(folds=3))
    summary = run_train_stage(shards, run, cfg)

    info = DatasetInfo.read(shards, MODALITIES, 0.0)
    every = keys_of(info, "all", 0.0)
    folds = [keys_of(DatasetInfo.read(shards, MODALITIES, cfg.model_copy(update={
        "cross_validation": CrossValidationConfig(folds=3, fold=fold)}).val_split), "val",
        (fold / 3, (fold + 1) / 3)) for fold in range(3)]
    assert all(folds) and set().union(*folds) == every and sum(map(len, folds)) == len(every)

    cv = json.loads((tmp_path / "cv" / CV).read_text())
    assert [f["fold"] for f in cv["per_fold"]] == [0, 1, 2] and cv["folds"] == 3
    for fold, keys in enumerate(folds):  # each fold validated on its own keys, all of them
        assert cv["per_fold"][fold]["val.label.samples"] == len(keys)
        assert (tmp_path / "cv" / "folds" / str(fold) / "model.safetensors").exists()
        assert fold_run(run, fold).url == cv["per_fold"][fold]["run"]
    losses = [f["val.loss"] for f in cv["per_fold"]]
    assert cv["mean"]["val.loss"] == pytest.approx(statistics.fmean(losses))
    assert cv["std"]["val.loss"] == pytest.approx(statistics.pstdev(losses))
    # the run's own validation records are the folds' means: what tune.metric reads
    records = [json.loads(line) for line in (tmp_path / "cv" / METRICS).read_text().splitlines()]
    assert [r["folds"] for r in records] == [3, 3] and records[-1]["val_loss"] == pytest.approx(cv["mean"]["val.loss"])
    assert summary.val_samples == len(every) and summary.model == run.url_of("folds")
    assert run_train_stage(shards, run, cfg).up_to_date
