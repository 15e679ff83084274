"""Distillation: a student a fraction of its teacher's size, trained on the teacher's outputs
and the labels of a corpus whose text carries the label, keeps most of its accuracy; export
reports the two side by side."""

import json

import numpy as np
import pytest

from tessera.core.errors import OutputConflict
from tessera.core.storage import Store
from tessera.train.config import ExportConfig, ModelConfig, TrainConfig
from tessera.train.export import export_run
from tessera.train.saved import teacher_for
from tessera.train.stage import run_train_stage
from tessera.train.tasks import Task
from tests.conftest import LABELS, MINI

pytestmark = pytest.mark.slow  # (see README: the test tiers)

PREFIXES = ("", "Perhaps ", "Clearly ", "In this picture, ", "Seen closely, ", "At a glance, ")
COMMON = dict(workers=2, micro_batch_size=16, loader_workers=0, val_fraction=0.25, warmup_steps=2,
              checkpoint_every=1000)


def captions_corpus(path, n: int, seed: int = 0) -> None:
    """N text-only rows: a mini caption (which says what its label is) behind a random opener."""
    rows = [json.loads(line) for line in (MINI / "manifest.jsonl").open()]
    captions = [(r["text"], r["label"]) for r in rows if r.get("text") and r.get("label")]
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            text, label = captions[int(rng.integers(len(captions)))]
            opener = PREFIXES[int(rng.integers(len(PREFIXES)))]
            f.write(json.dumps({"key": f"c{i:05d}", "text": opener + text, "label": label}) + "\n")


@pytest.fixture(scope="module")
def embedded_captions(ray_session, tmp_path_factory):
    from tessera.features.config import EmbedConfig
    from tessera.features.stage import run_embed_stage
    from tessera.preprocess.config import ShardConfig
    from tessera.preprocess.stage import run_shard_stage

    folder = tmp_path_factory.mktemp("captions")
    captions_corpus(folder / "manifest.jsonl", 240)
    run_shard_stage(str(folder / "manifest.jsonl"), Store(str(folder / "shards")),
                    ShardConfig(labels=LABELS, samples_per_shard=64), progress=False)
    run_embed_stage(Store(str(folder / "shards")), EmbedConfig(), progress=False)
    return folder / "shards"


def test_a_quarter_size_student_keeps_the_teachers_accuracy_and_agrees_with_it(embedded_captions, tmp_path):
    teacher = tmp_path / "teacher"
    run_train_stage(Store(str(embedded_captions)), Store(str(teacher)), TrainConfig(
        model=ModelConfig(modalities=("text",), hidden=128, blocks=2), epochs=8, lr=3e-3, **COMMON))
    student = tmp_path / "student"  # pipeline-parallel: the teacher runs on the last stage, beside the heads
    summary = run_train_stage(Store(str(embedded_captions)), Store(str(student)), TrainConfig(
        model=ModelConfig(modalities=("text",), hidden=16, blocks=1, dropout=0.0), epochs=12, lr=1e-2,
        parallel="pipeline", zero_stage=0, distill_from=str(teacher), distill={"alpha": 0.7, "temperature": 2.0},
        **COMMON))
    assert summary.distilled_from == str(teacher)

    result = export_run(Store(str(student)), Store(str(tmp_path / "export")), ExportConfig())
    report = result.distillation
    big, small = report["teacher"], report["student"]
    print(json.dumps(report, indent=1))
    assert json.loads((tmp_path / "export" / "export.json").read_text())["distillation"] == \
        json.loads(json.dumps(report))
    assert small["parameters"] <= big["parameters"] / 4 and report["parameter_ratio"] <= 0.25
    assert small["bytes_fp32"] < big["bytes_fp32"] and small["bytes_int8"] < small["bytes_fp32"]
    assert big["onnx_samples_per_s"] > 0 and small["onnx_samples_per_s"] > 0
    teacher_accuracy, student_accuracy = big["tasks"]["label"]["accuracy"], small["tasks"]["label"]["accuracy"]
    assert teacher_accuracy > 0.5  # the teacher learned the task (7 classes)
    assert student_accuracy >= 0.9 * teacher_accuracy, (student_accuracy, teacher_accuracy)
    assert small["agreement_with_teacher"]["label"] >= 0.85


def test_a_teacher_of_other_inputs_or_tasks_is_refused(trained_mini):
    meta = json.loads((trained_mini / "model.json").read_text())
    tasks = (Task("label", "label", "classification", LABELS),)
    with pytest.raises(OutputConflict, match="embedding widths .* tasks"):
        teacher_for(Store(str(trained_mini)), {"text": 384}, tasks, ModelConfig.model_validate(meta["model"]))
    with pytest.raises(OutputConflict, match="holds no trained model"):
        teacher_for(Store(str(trained_mini / "nothing")), meta["dims"], tasks, ModelConfig())
