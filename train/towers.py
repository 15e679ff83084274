"""Encoder towers trained end to end (`train.finetune`): the same encoders that made the
cached vectors (the shards' embed config: features/encoders.py), as trainable modules from
prepared arrays to vectors, their inputs made by the loader from the shards' members, and
the trained towers saved as model folders (RUN/towers/, train/layout.py) that `tessera embed
--from-run` loads."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tessera.core.storage import Store
from tessera.features.config import EmbedConfig
from tessera.features.prepare import audio_input, image_input, text_input, video_input
from tessera.train.layout import TOWERS
from tessera.train.model import TOWER_INPUTS


@functools.cache
def _encoders(embed_json: str) -> dict:
    from tessera.features.encoders import build_encoders

    return build_encoders(EmbedConfig.model_validate_json(embed_json))


@functools.cache
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@dataclass(frozen=True)
class TowerSpec:
    """Which towers a run trains and how the shards were embedded (EmbedConfig as JSON): what
    a loader process needs to prepare their inputs, and a rank to build them."""

    embed: str
    modalities: tuple[str, ...]

    def encoder(self, modality: str):
        return _encoders(self.embed)[modality]

    @property
    def trained(self) -> tuple[str, ...]:
        """The towers themselves: video's frames go through the image tower (train/config.py
        has image fine-tuned beside video)."""
        return tuple(m for m in self.modalities if m != "video")

    def identities(self) -> dict[str, str]:
        return {m: self.encoder(m).identity() for m in self.modalities}

    def batch(self, members: Sequence[dict[str, bytes | None]]) -> dict[str, dict[str, torch.Tensor]]:
        """Each tower's batched input from the samples' members (an absent member: an empty
        input, which the mask leaves out)."""
        out = {}
        for modality in self.modalities:
            encoder = self.encoder(modality)
            payloads = [m.get(modality) for m in members]
            if modality == "text":
                tokens = _tokenizer(str(encoder.folder()))(
                    [text_input(p) if p is not None else "" for p in payloads], padding=True, truncation=True,
                    max_length=encoder.cfg.max_length, return_tensors="pt")
                out[modality] = {k: tokens[k] for k in TOWER_INPUTS["text"]}
            elif modality == "audio":
                out[modality] = _waveforms(payloads, encoder.cfg)
            elif modality == "video":
                out[modality] = _frames(payloads, encoder.image.cfg)
            else:
                size = encoder.cfg.image_size
                out[modality] = {"pixels": torch.from_numpy(np.stack([
                    image_input(p, encoder.cfg) if p is not None else np.zeros((3, size, size), np.float32)
                    for p in payloads]))}
        return out


def _waveforms(payloads: Sequence[bytes | None], cfg) -> dict[str, torch.Tensor]:
    """The clips prepared as the audio encoder prepares them (resampled, normalized, zero-padded
    to whole buckets), padded further to the batch's longest; the lengths say which samples are
    real (the tower pools over those frames only)."""
    clips = [audio_input(p, cfg) if p is not None else (np.zeros(1, np.float32), 0) for p in payloads]
    samples = np.zeros((len(clips), max(len(c) for c, _ in clips)), np.float32)
    for row, (clip, _) in enumerate(clips):
        samples[row, : len(clip)] = clip
    return {"samples": torch.from_numpy(samples), "lengths": torch.tensor([n for _, n in clips])}


def _frames(payloads: Sequence[bytes | None], cfg) -> dict[str, torch.Tensor]:
    """The clips' sampled frames as the image tower's input, all in one batch, and how many
    each clip has (an absent clip: none)."""
    clips = [video_input(p, cfg) if p is not None else np.zeros((0, 3, cfg.image_size, cfg.image_size), np.float32)
             for p in payloads]
    return {"frames": torch.from_numpy(np.concatenate(clips)), "counts": torch.tensor([len(c) for c in clips])}


def _blocks(modality: str, model) -> tuple[nn.ModuleList, list[nn.Module]]:
    """A tower's transformer blocks, and the modules after the last one."""
    if modality == "text":
        return model[0].auto_model.encoder.layer, list(model)[1:]
    if modality == "audio":  # (wav2vec2: the last hidden state, after a final norm in the stable-norm variant)
        return model.encoder.layers, [model.encoder.layer_norm] if model.config.do_stable_layer_norm else []
    vision = model.vision_model
    return vision.encoder.layers, [vision.post_layernorm, model.visual_projection]


def build_towers(spec: TowerSpec, unfreeze_last: int | None = None, checkpointing: bool = False) -> nn.ModuleDict:
    """The towers with the weights the cached vectors were made with, trainable as configured."""
    from tessera.features.encoders import _ImageVectors, _MeanPooledAudio, _SentenceVectors

    vectors = {"text": _SentenceVectors, "image": _ImageVectors, "audio": _MeanPooledAudio}

    towers = nn.ModuleDict()
    for modality in spec.trained:
        encoder = spec.encoder(modality)
        model = encoder._build(encoder.folder())
        if modality == "text" and getattr(model[0].auto_model, "pooler", None) is not None:
            model[0].auto_model.pooler.requires_grad_(False)  # the sentence vector pools tokens; it never runs
        if unfreeze_last is not None:
            blocks, after = _blocks(modality, model)
            model.requires_grad_(False)
            for module in [*blocks[-unfreeze_last:], *after]:
                module.requires_grad_(True)
        if checkpointing:
            hf = model[0].auto_model if modality == "text" else model
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        towers[modality] = vectors[modality](model.train())
    return towers


def save_towers(spec: TowerSpec, state: dict[str, torch.Tensor], run: Store, unfreeze_last: int | None
                ) -> dict[str, str]:
    """The trained towers (their part of a consolidated state dict, keys `towers.<m>.model.*`)
    as model folders in RUN/towers/<m>/; returns their encoder identities there. A frozen
    parameter keeps its encoder's weights (ZeRO-1 checkpoints leave frozen ones out)."""
    towers = build_towers(spec, unfreeze_last)
    missing, unexpected = towers.load_state_dict(
        {k.removeprefix("towers."): v for k, v in state.items() if k.startswith("towers.")}, strict=False)
    frozen = {name for name, p in towers.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise ValueError(f"the trained towers' weights do not fit them: {unexpected or sorted(set(missing) - frozen)}")
    identities = {}
    for modality, tower in towers.items():
        with tempfile.TemporaryDirectory() as local:
            folder = Path(local)
            if modality == "text":
                tower.model.save(str(folder), safe_serialization=True)
            else:
                tower.model.save_pretrained(str(folder), safe_serialization=True)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                run.put_file(str(path), f"{TOWERS}/{modality}/{path.relative_to(folder)}")
            identities[modality] = tower_identity(spec, modality, folder)
            if modality == "image" and "video" in spec.modalities:
                identities["video"] = tower_identity(spec, "video", folder)
    return identities


def tower_identity(spec: TowerSpec, modality: str, folder: Path) -> str:
    """The encoder identity of a tower saved in FOLDER (the base's kind and preparation, its weights)."""
    from tessera.features.encoders import build_encoders

    tower = "image" if modality == "video" else modality  # (video: frames through the image tower)
    cfg = EmbedConfig.model_validate_json(spec.embed).with_weights({tower: str(folder)})
    return build_encoders(cfg)[modality].identity()

