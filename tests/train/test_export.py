"""Export: ONNX equal to the eager model, int8 smaller and as accurate, pruning as configured."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from tessera.core.storage import Store
from tessera.train.config import ExportConfig
from tessera.train.evaluate import data_for, eager_scorer, eval_batches, trained_on, without
from tessera.train.export import export_run, pruned
from tessera.train.inputs import onnx_scorer
from tessera.train.saved import load_model, read_saved

# 18 validation samples: one changed prediction moves accuracy by 0.056
TOLERANCE = 0.06


@pytest.fixture(scope="module")
def exported(trained_mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    result = export_run(Store(str(trained_mini)), Store(str(out)),
                        ExportConfig(prune_sparsity=0.5, accuracy_tolerance=TOLERANCE))
    return out, result


def test_every_variant_is_written_with_its_size_and_metrics(exported):
    out, result = exported
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(result.to_json()))
    for name in ("model.safetensors", "model.json", "preprocess.json", "model.onnx", "model-int8.onnx",
                 "model-pruned.onnx"):
        assert (out / name).stat().st_size > 0, name
    fp32, int8 = result.variants["fp32"], result.variants["int8"]
    accuracy = {n: v["tasks"]["label"]["accuracy"] for n, v in result.variants.items()}
    print(f"int8 size ratio {int8['size_ratio_vs_fp32']}: {fp32['bytes']} -> {int8['bytes']} bytes; "
          f"val accuracy {accuracy}")
    assert int8["bytes"] < fp32["bytes"] / 2.5
    assert int8["within_tolerance"] and abs(accuracy["int8"] - accuracy["fp32"]) <= TOLERANCE
    assert set(fp32["tasks"]) == {"label", "has_audio", "media", "words"}
    assert all(task["max_abs_diff_vs_eager"] < 1e-4 for task in fp32["tasks"].values())
    assert fp32["onnx_samples_per_s"] > 0
    preprocess = json.loads((out / "preprocess.json").read_text())
    assert set(preprocess) == {"shard", "embed", "encoders"}
    assert set(preprocess["encoders"]) == {"text", "image", "audio", "video"}


def test_onnx_equals_the_eager_model_on_the_same_inputs(exported, trained_mini):
    out, _ = exported
    meta, state = read_saved(Store(str(trained_mini)))
    model = load_model(meta, state)
    shards, cfg = trained_on(Store(str(trained_mini)))
    info = data_for(meta, shards, cfg, Store(str(trained_mini)))
    batch = next(eval_batches(info, "val", cfg, 64))
    onnx, eager = onnx_scorer(out / "model.onnx"), eager_scorer(model)
    # every head; batch sizes other than the export's example, and samples missing modalities
    for inputs in (batch, without(batch, info.dims, "text"), {k: v[:1] for k, v in batch.items()}):
        served, reference = onnx(inputs), eager(inputs)
        assert set(served) == {"label", "has_audio", "media", "words"}
        for task in model.tasks:
            unit = task.scale if task.kind == "regression" else 1  # a number: compared in standard units
            assert np.abs(served[task.name] - reference[task.name]).max() / unit < 1e-4, task.name


def test_magnitude_pruning_zeroes_the_configured_share_of_linear_weights(trained_mini):
    model = load_model(*read_saved(Store(str(trained_mini))))
    sparse = pruned(model, 0.5)
    weights = torch.cat([m.weight.flatten() for m in sparse.modules() if isinstance(m, nn.Linear)])
    assert float((weights == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert not any(name.endswith("_orig") for name, _ in sparse.named_parameters())  # pruning made permanent
    assert all(float((m.weight == 0).float().mean()) < 0.01 for m in model.modules() if isinstance(m, nn.Linear))
