"""A trained model as a run leaves it: model.safetensors (consolidated fp32) + model.json
(what rebuilds it: embedding widths, tasks, model config, pixel statistics)."""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors

from preprocess.layout import OutputConflict
from preprocess.storage import Store
from train.config import ModelConfig
from train.layout import META, WEIGHTS
from train.model import MultimodalModel
from train.tasks import Task, tasks_from_meta, tasks_meta


def read_saved(run: Store) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model.json, state dict) of the run (or export) folder RUN."""
    missing = [name for name in (WEIGHTS, META) if not run.exists(name)]
    if missing:
        raise FileNotFoundError(f"{run.url} holds no trained model ({', '.join(missing)} missing)")
    return run.read_json(META), load_safetensors(run.read_bytes(WEIGHTS))


def load_model(meta: dict, state: dict[str, torch.Tensor]) -> MultimodalModel:
    if "tasks" not in meta:
        raise ValueError("this model was trained by an older tessera (model.json has no tasks): train it again")
    model = MultimodalModel(meta["dims"], tasks_from_meta(meta["tasks"]), ModelConfig.model_validate(meta["model"]))
    model.load_state_dict(state)
    return model.eval()


def saved_for(run: Store, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """read_saved, its failure said as a conflict of WHAT (starting from it, distilling it)."""
    try:
        return read_saved(run)
    except FileNotFoundError as e:
        raise OutputConflict(f"cannot {what}: {e}") from None


def compatible_start(run: Store, dims: dict[str, int], tasks: tuple[Task, ...], model: ModelConfig
                     ) -> dict[str, torch.Tensor]:
    """The weights of RUN to start a new training from, when they fit this data and model."""
    meta, state = saved_for(run, "start from it")
    wanted = {"dims": dims, "tasks": tasks_meta(tasks), "model": model.model_dump(mode="json")}
    changed = sorted(k for k, v in wanted.items() if meta[k] != v)
    if changed:
        raise OutputConflict(f"cannot start from {run.url}: its {' and '.join(changed)} differ from this training's "
                             f"({', '.join(f'{k}: {meta.get(k)} vs {wanted[k]}' for k in changed)})")
    return state


def teacher_for(run: Store, dims: dict[str, int], tasks: tuple[Task, ...], model: ModelConfig
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model.json, weights) of the teacher RUN, when a student of MODEL on this data can learn
    from it: the same inputs (embedding widths, image branch) and the same tasks (names,
    kinds, label sets; a regression target's statistics may differ)."""
    meta, state = saved_for(run, "distill it")
    teacher = ModelConfig.model_validate(meta["model"])
    problems = []
    if meta["dims"] != dims:
        problems.append(f"embedding widths {meta['dims']} vs {dims}")
    if (teacher.image_branch, teacher.image_branch_size) != (model.image_branch, model.image_branch_size):
        problems.append("image branch settings (image_branch, image_branch_size) differ")
    mine = [t.signature for t in tasks]
    theirs = [t.signature for t in tasks_from_meta(meta.get("tasks", []))]
    if mine != theirs:
        problems.append(f"tasks {theirs} vs {mine}")
    if problems:
        raise OutputConflict(f"cannot distill {run.url} into this model: {'; '.join(problems)}")
    return meta, state
