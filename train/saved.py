"""A trained model as a run leaves it: model.safetensors (consolidated fp32) + model.json
(what rebuilds it: embedding widths, labels, model config, pixel statistics)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors

from preprocess.layout import OutputConflict
from preprocess.storage import filesystem, join
from train.config import ModelConfig
from train.model import MultimodalModel

WEIGHTS, META = "model.safetensors", "model.json"
RUN_CONFIG, TRAIN_SUMMARY = "train-config.json", "train-summary.json"


def read_saved(run: str, storage_options: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model.json, state dict) of the run folder RUN, local or on a store."""
    fs, root = filesystem(run, storage_options or {})
    missing = [name for name in (WEIGHTS, META) if not fs.exists(join(root, name))]
    if missing:
        raise FileNotFoundError(f"{run} holds no trained model ({', '.join(missing)} missing)")
    return json.loads(fs.cat_file(join(root, META))), load_safetensors(fs.cat_file(join(root, WEIGHTS)))


def load_model(meta: dict, state: dict[str, torch.Tensor]) -> MultimodalModel:
    model = MultimodalModel(meta["dims"], len(meta["labels"]), ModelConfig.model_validate(meta["model"]))
    model.load_state_dict(state)
    return model.eval()


def compatible_start(run: str, dims: dict[str, int], labels: tuple[str, ...], model: ModelConfig,
                     storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The weights of RUN to start a new training from, when they fit this data and model."""
    try:
        meta, state = read_saved(run, storage_options)
    except FileNotFoundError as e:
        raise OutputConflict(f"cannot start from it: {e}") from None
    wanted = {"dims": dims, "labels": list(labels), "model": model.model_dump(mode="json")}
    changed = sorted(k for k, v in wanted.items() if meta[k] != v)
    if changed:
        raise OutputConflict(f"cannot start from {run}: its {' and '.join(changed)} differ from this training's "
                         f"({', '.join(f'{k}: {meta[k]} vs {wanted[k]}' for k in changed)})")
    return state
