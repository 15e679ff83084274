"""A trained model as a run leaves it: model.safetensors (consolidated fp32) + model.json
(what rebuilds it: embedding widths, tasks, model config, pixel statistics)."""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors

from tessera.core.errors import NotAnInput, OutputConflict
from tessera.core.storage import Store
from tessera.train.config import ModelConfig
from tessera.train.layout import META, WEIGHTS, ModelMeta
from tessera.train.model import Alignment, MultimodalModel
from tessera.train.tasks import Task, tasks_from_meta, tasks_meta


def read_saved(run: Store) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
    """(model.json, state dict) of the run (or export) folder RUN."""
    missing = [name for name in (WEIGHTS, META) if not run.exists(name)]
    if missing:
        raise NotAnInput(f"{run.url} holds no trained model ({', '.join(missing)} missing)")
    return ModelMeta.read(run), load_safetensors(run.read_bytes(WEIGHTS))


def load_model(meta: ModelMeta, state: dict[str, torch.Tensor]) -> MultimodalModel:
    align = Alignment(**meta.align) if meta.align else None
    model = MultimodalModel(meta.dims, tasks_from_meta(meta.tasks), ModelConfig.model_validate(meta.model),
                            align=align)
    model.load_state_dict(state)
    return model.eval()


def saved_for(run: Store, what: str) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
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
    changed = sorted(k for k, v in wanted.items() if getattr(meta, k) != v)
    if changed:
        raise OutputConflict(f"cannot start from {run.url}: its {' and '.join(changed)} differ from this training's "
                             f"({', '.join(f'{k}: {getattr(meta, k)} vs {wanted[k]}' for k in changed)})")
    return state


def teacher_for(run: Store, dims: dict[str, int], tasks: tuple[Task, ...], model: ModelConfig
                ) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
    """(model.json, weights) of the teacher RUN, when a student of MODEL on this data can learn
    from it: the same inputs (embedding widths, image branch) and the same tasks (names,
    kinds, label sets; a regression target's statistics may differ)."""
    meta, state = saved_for(run, "distill it")
    teacher = ModelConfig.model_validate(meta.model)
    problems = []
    if meta.dims != dims:
        problems.append(f"embedding widths {meta.dims} vs {dims}")
    if (teacher.image_branch, teacher.image_branch_size) != (model.image_branch, model.image_branch_size):
        problems.append("image branch settings (image_branch, image_branch_size) differ")
    mine = [t.signature for t in tasks]
    theirs = [t.signature for t in tasks_from_meta(meta.tasks)]
    if mine != theirs:
        problems.append(f"tasks {theirs} vs {mine}")
    if problems:
        raise OutputConflict(f"cannot distill {run.url} into this model: {'; '.join(problems)}")
    return meta, state
