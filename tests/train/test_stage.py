"""DeepSpeed training for real: 2 CPU workers under Ray Train (gloo + DeepSpeed's CPU accelerator)."""

import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.core.errors import OutputConflict
from tessera.core.lease import Lease, LeaseConfig
from tessera.core.storage import Store
from tessera.train.config import ModelConfig, TrainConfig
from tessera.train.layout import TrainSummary
from tessera.train.model import MultimodalModel
from tessera.train.saved import load_model, read_saved
from tessera.train.stage import run_train_stage
from tests.conftest import MINI_TASKS, train_killed_at_first_checkpoint

BASE = {"workers": 2, "micro_batch_size": 4, "epochs": 4, "checkpoint_every": 6, "loader_workers": 2,
        "warmup_steps": 2, "lr": 3e-3}


def losses(run: Path) -> dict[int, float]:
    """Per-step training loss; after a resume the step's last record counts."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            out[record["step"]] = record["loss"]
    return out


def exported_model(run: Path) -> MultimodalModel:
    return load_model(*read_saved(Store(str(run))))


def assert_learns(run: Path) -> None:
    steps = losses(run)
    values = [steps[s] for s in sorted(steps)]
    assert sum(values[:3]) / 3 > 1.5 * sum(values[-3:]) / 3, values


@pytest.fixture(scope="module")
def zero2_run(embedded_mini, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("zero2")
    run_train_stage(Store(str(embedded_mini)), Store(str(run)), TrainConfig(zero_stage=2, **BASE))
    return run


@pytest.mark.slow
def test_zero2_data_parallel_reduces_the_loss_and_exports(zero2_run):
    assert_learns(zero2_run)
    summary = TrainSummary.read(Store(str(zero2_run)))
    assert summary.steps == 24 and summary.checkpoint == "step-0000024"
    assert (zero2_run / "checkpoints" / "latest").read_text() == "step-0000024"
    epochs = [json.loads(line) for line in (zero2_run / "metrics.jsonl").read_text().splitlines()
              if "val_accuracy" in line]
    assert len(epochs) == 4 and epochs[-1]["val_samples"] == summary.val_samples
    model = exported_model(zero2_run)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())


@pytest.mark.slow
def test_a_finished_run_trained_again_is_up_to_date_and_writes_nothing(zero2_run, embedded_mini):
    written = {p: p.read_bytes() for p in zero2_run.rglob("*") if p.is_file() and p.name != "lease.json"}
    summary = run_train_stage(Store(str(embedded_mini)), Store(str(zero2_run)), TrainConfig(zero_stage=2, **BASE))
    assert summary.up_to_date and summary.steps == 24
    assert {p: p.read_bytes() for p in written} == written


@pytest.mark.slow
def test_training_can_start_from_an_earlier_runs_weights(zero2_run, embedded_mini, tmp_path):
    cold = json.loads((zero2_run / "train-summary.json").read_text())
    warm = run_train_stage(Store(str(embedded_mini)), Store(str(tmp_path)),
                           TrainConfig(zero_stage=2, init_from=str(zero2_run), **{**BASE, "epochs": 1}))
    assert warm.init_from == str(zero2_run) and not warm.resumed
    # the first step already has the trained model's loss, not a fresh model's
    assert warm.first_loss < 0.5 * cold["first_loss"], (warm.first_loss, cold["first_loss"])


@pytest.mark.slow
def test_starting_from_weights_of_another_model_shape_is_refused(zero2_run, embedded_mini, tmp_path):
    other = TrainConfig(init_from=str(zero2_run), model=ModelConfig(hidden=64), **BASE)
    with pytest.raises(OutputConflict, match="its model differ"):
        run_train_stage(Store(str(embedded_mini)), Store(str(tmp_path)), other)
    with pytest.raises(OutputConflict, match="holds no trained model"):
        run_train_stage(Store(str(embedded_mini)), Store(str(tmp_path / "b")),
                        TrainConfig(init_from=str(tmp_path), **BASE))


def task_losses(run: Path) -> dict[str, list[float]]:
    """Each task's training loss per step (None where no sample of the step had its target)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("loss") is not None]
    return {task: [r["task_loss"][task] for r in steps] for task in steps[0]["task_loss"]}


@pytest.mark.slow
def test_pipeline_two_stages_trains_every_task_head(embedded_mini, tmp_path):
    summary = run_train_stage(Store(str(embedded_mini)), Store(str(tmp_path)),
                              TrainConfig(parallel="pipeline", zero_stage=0, tasks=MINI_TASKS, **BASE))
    assert_learns(tmp_path)
    for task, values in task_losses(tmp_path).items():  # each head learns, not only the sum
        values = [v for v in values if v is not None]
        assert sum(values[:4]) / 4 > 1.3 * sum(values[-4:]) / 4, (task, values)
    # one data-parallel replica: each step takes one micro-batch of the 39 training samples
    assert summary.steps == 40 and summary.tasks == ["label", "has_audio", "media", "words"]
    stage_files = sorted(p.name for p in (tmp_path / "checkpoints" / summary.checkpoint).glob("layer_*"))
    assert len(stage_files) == 4  # fusion encoder, 2 blocks, the heads: split over the 2 stages
    assert set(summary.val_tasks) == {"label", "has_audio", "media", "words"}
    model = exported_model(tmp_path)
    assert [t.name for t in model.tasks] == ["label", "has_audio", "media", "words"]


@pytest.mark.slow
def test_zero3_runs_checkpoints_and_goes_on_with_another_number_of_workers(embedded_mini, tmp_path):
    cfg = TrainConfig(zero_stage=3, **{**BASE, "epochs": 1, "checkpoint_every": 3})
    summary = run_train_stage(Store(str(embedded_mini)), Store(str(tmp_path)), cfg)
    tag = tmp_path / "checkpoints" / summary.checkpoint
    assert summary.steps == 6 and len(list(tag.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert (tmp_path / "checkpoints" / "step-0000003").is_dir()
    exported_model(tmp_path)
    # one more epoch on 1 worker: the 2 ranks' partitioned parameters and optimizer states are
    # joined through DeepSpeed's universal form (10 steps an epoch on 1 worker)
    more = run_train_stage(Store(str(embedded_mini)), Store(str(tmp_path)),
                           TrainConfig(zero_stage=3, **{**BASE, "workers": 1, "epochs": 2, "checkpoint_every": 3}))
    assert more.resumed and more.steps == 20
    assert set(losses(tmp_path)) == set(range(1, 7)) | set(range(11, 21))
    assert not any(p.name.endswith("-universal") for p in (tmp_path / "checkpoints").iterdir())
    exported_model(tmp_path)


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_losses(embedded_mini, zero2_run, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"runtime": {"workers": 2}, "train": {"zero_stage": 2, **BASE}}))
    resumed_from = train_killed_at_first_checkpoint(embedded_mini, run, config, timeout=300)
    assert resumed_from < 24, "the run finished before it could be killed"

    summary = run_train_stage(Store(str(embedded_mini)), Store(str(run)), TrainConfig(zero_stage=2, **BASE))
    assert summary.resumed and summary.steps == 24
    reference, resumed = losses(zero2_run), losses(run)
    # CPU, same data order, dropout reseeded per step: identical up to float round-off
    for step in range(resumed_from + 1, 25):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


@pytest.mark.slow
def test_a_run_goes_on_with_another_number_of_workers(embedded_mini, zero2_run, tmp_path):
    """A finished 2-worker ZeRO-2 run trained one more epoch on 1 worker: its last checkpoint,
    saved by 2 ranks, is loaded in DeepSpeed's universal form, the step and the learning-rate
    schedule are put in the 1-worker layout (10 steps an epoch, not 6: 39 samples in batches of
    4 from 2 loaders), and the loss goes on from the trained model's."""
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    cfg = TrainConfig(zero_stage=2, **{**BASE, "workers": 1, "epochs": 5})
    summary = run_train_stage(Store(str(embedded_mini)), Store(str(run)), cfg)
    assert summary.resumed and summary.steps == 50
    after = losses(run)
    assert set(after) == set(range(1, 25)) | set(range(41, 51))  # epochs 1-4 as 2 workers saw them, then 5
    initial, trained = np.mean([after[s] for s in (1, 2, 3)]), np.mean([after[s] for s in range(22, 25)])
    going_on = np.mean([after[s] for s in (41, 42, 43)])
    assert abs(going_on - trained) < abs(going_on - initial), (initial, trained, going_on)
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "lr" in r}
    progress = (41 - BASE["warmup_steps"]) / (50 - BASE["warmup_steps"])  # cosine over this layout's 50 steps
    assert records[41]["lr"] == pytest.approx(BASE["lr"] * 0.5 * (1 + math.cos(math.pi * progress)))
    assert not any(p.name.endswith("-universal") for p in (run / "checkpoints").iterdir())  # dropped once loaded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_dying_in_second_save(rank: int, world: int, port: int, job) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    from tessera.train.loop import run_worker

    save_zero = DeepSpeedEngine._save_zero_checkpoint

    def dying_save(self, save_path, tag):
        if rank == 1 and tag == "step-0000004":
            os._exit(1)  # this rank dies while writing its ZeRO shard of the second checkpoint
        return save_zero(self, save_path, tag)

    DeepSpeedEngine._save_zero_checkpoint = dying_save
    dist.init_process_group("gloo", rank=rank, world_size=world)
    run_worker(job, rank, world)


@pytest.mark.slow
def test_rank_killed_during_save_leaves_latest_at_the_previous_checkpoint(embedded_mini, tmp_path):
    import torch.multiprocessing as mp

    from tessera.train.data import DatasetInfo
    from tessera.train.loop import TrainJob

    cfg = TrainConfig(zero_stage=2, **{**BASE, "max_steps": 6, "checkpoint_every": 2, "loader_workers": 0})
    run = Store(str(tmp_path))
    info = DatasetInfo.read(Store(str(embedded_mini)), cfg.model.modalities, cfg.val_fraction)
    with Lease(run, LeaseConfig(), "test") as fence:
        job = TrainJob(cfg, info, run, run.child("checkpoints"), fence)
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker_dying_in_second_save, args=(r, 2, port, job)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
            if p.is_alive():
                p.kill()
    assert procs[1].exitcode == 1 and procs[0].exitcode != 0
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-0000002"
    assert (ckpt / "step-0000004").is_dir()  # written in part, never pointed at


@pytest.mark.slow
def test_checkpoints_go_to_their_own_store(embedded_mini, tmp_path, s3_options):
    """train.checkpoint_url apart from the run folder (resuming from a store on nodes without
    the files: tests/train/test_run_store.py and the private-disk cluster test)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options["s3"])
    fs.mkdir("checkpoints")
    cfg = {**BASE, "max_steps": 6, "checkpoint_every": 3, "checkpoint_url": "s3://checkpoints/run"}
    run = Store(str(tmp_path / "run"), s3_options)  # (its options reach the checkpoints' store)
    summary = run_train_stage(Store(str(embedded_mini)), run, TrainConfig(**cfg))
    assert summary.checkpoint == "step-0000006" and fs.cat_file("checkpoints/run/latest") == b"step-0000006"
    assert fs.exists("checkpoints/run/step-0000003/mp_rank_00_model_states.pt")
    assert len(fs.glob("checkpoints/run/step-0000006/zero_pp_rank_*_optim_states.pt")) == 2
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert isinstance(exported_model(tmp_path / "run"), MultimodalModel)  # consolidated from the store's files
