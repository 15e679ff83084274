"""The encoders of an all-ONNX bundle (`tessera export --bundle`): each model an onnxruntime
session, its inputs prepared by the very code the torch encoders use (features/prepare.py),
the text tokenized by the `tokenizers` library from the model's own tokenizer.json. The
interface is the torch encoders' (identity, load, prepare, embed, dim), so `tessera predict
--bundle` and `tessera serve --bundle` swap one for the other; nothing here imports torch.

The bundle's bundle.json (train/layout.py) says per modality: the identity of the torch encoder the graph was
exported from (what the model was trained with), its width, its config (the preparation
settings) and which graph it runs (video runs the image graph on each frame)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tessera.core.storage import Store
from tessera.features.config import AudioEncoderConfig, ImageEncoderConfig, TextEncoderConfig
from tessera.features.prepare import audio_input, by_length, image_input, per_clip, text_input, video_input
from tessera.train.layout import BUNDLE_META, TOKENIZER, encoder_onnx


def session(model: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the int8 graphs' shape-inference notes are not
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """One modality's graph; `spec` is its bundle.json entry."""

    modality: str
    config_class: Any

    def __init__(self, spec: dict, model: bytes):
        self.spec = spec
        self.cfg = self.config_class.model_validate(spec["config"])
        self.session = session(model)

    def identity(self) -> str:
        return self.spec["identity"]

    def load(self, device: str = "cpu", precision: str = "auto") -> None:
        """Loaded already (the session); onnxruntime runs on the CPU."""

    @property
    def dim(self) -> int:
        return self.spec["dim"]

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, inputs)[0].astype(np.float32)


class OnnxTextEncoder(OnnxEncoder):
    modality = "text"
    config_class = TextEncoderConfig

    def __init__(self, spec: dict, model: bytes, tokenizer: bytes):
        from tokenizers import Tokenizer

        super().__init__(spec, model)
        self.tokenizer = Tokenizer.from_str(tokenizer.decode())
        self.tokenizer.enable_truncation(self.cfg.max_length)
        self.tokenizer.enable_padding(pad_id=spec["pad_id"], pad_token=spec["pad_token"])

    def prepare(self, payload: bytes) -> str:
        return text_input(payload)

    def embed(self, items: list[str]) -> np.ndarray:
        tokens = self.tokenizer.encode_batch(items)
        return self.run(input_ids=np.array([t.ids for t in tokens], np.int64),
                        attention_mask=np.array([t.attention_mask for t in tokens], np.int64),
                        token_type_ids=np.array([t.type_ids for t in tokens], np.int64))


class OnnxImageEncoder(OnnxEncoder):
    modality = "image"
    config_class = ImageEncoderConfig

    def prepare(self, payload: bytes) -> np.ndarray:
        return image_input(payload, self.cfg)

    def embed(self, items: list[np.ndarray]) -> np.ndarray:
        return self.run(pixels=np.stack(items))


class OnnxVideoEncoder(OnnxImageEncoder):
    """Each sampled frame through the image graph (T x D, flattened, as the cache holds it)."""

    modality = "video"

    def prepare(self, payload: bytes) -> np.ndarray:
        return video_input(payload, self.cfg)

    def embed(self, items: list[np.ndarray]) -> np.ndarray:
        return np.stack(per_clip(super().embed([frame for clip in items for frame in clip]), items))


class OnnxAudioEncoder(OnnxEncoder):
    modality = "audio"
    config_class = AudioEncoderConfig

    def prepare(self, payload: bytes) -> tuple[np.ndarray, int]:
        return audio_input(payload, self.cfg)

    def embed(self, items: list[tuple[np.ndarray, int]]) -> np.ndarray:
        out = np.zeros((len(items), self.dim), np.float32)
        for rows in by_length(items):
            out[rows] = self.run(samples=np.stack([items[i][0] for i in rows]),
                                 lengths=np.array([items[i][1] for i in rows], np.int64))
        return out


BUNDLE_ENCODERS = {cls.modality: cls for cls in (OnnxImageEncoder, OnnxVideoEncoder, OnnxAudioEncoder)}


def load_bundle(bundle: Store, variant: str, modalities) -> dict[str, OnnxEncoder]:
    """The encoders of MODALITIES in the BUNDLE folder, each graph of VARIANT (fp32 or int8) read once."""
    if not bundle.exists(BUNDLE_META):
        raise ValueError(f"{bundle.url} holds no encoder bundle: export with `tessera export RUN OUT --bundle`")
    specs = bundle.read_json(BUNDLE_META)["encoders"]
    missing = [m for m in modalities if m not in specs]
    if missing:
        raise ValueError(f"{bundle.url}: the bundle has no {missing} encoder")
    graphs: dict[str, bytes] = {}
    encoders: dict[str, OnnxEncoder] = {}
    for modality in modalities:
        spec = specs[modality]
        graph = spec["graph"]
        if graph not in graphs:
            name = encoder_onnx(graph, variant)
            if not bundle.exists(name):
                raise ValueError(f"{bundle.url} has no {variant!r} graph ({name})")
            graphs[graph] = bundle.read_bytes(name)
        if modality == "text":
            encoders[modality] = OnnxTextEncoder(spec, graphs[graph], bundle.read_bytes(TOKENIZER))
        else:
            encoders[modality] = BUNDLE_ENCODERS[modality](spec, graphs[graph])
    return encoders
