"""The served model's inputs as arrays, and the ONNX runtime that scores them: shared by
training (the packed vectors, the image branch's pixels), export and prediction. numpy, Pillow
and onnxruntime only: `tessera predict --bundle` runs without torch."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tessera.core.storage import Store
from tessera.train.layout import ModelMeta

Scorer = Callable[[dict], dict[str, np.ndarray]]  # a batch (features, mask[, pixels]) -> each task's scores


def pack_vectors(n: int, dims: dict[str, int],
                 present: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The model's packed input: features [n, sum(dims)] (the modalities side by side, zeros
    where absent) and mask [n, modalities]; present[m] = (which rows have m, their vectors)."""
    features = np.zeros((n, sum(dims.values())), np.float32)
    mask = np.zeros((n, len(dims)), np.float32)
    offset = 0
    for j, (modality, dim) in enumerate(dims.items()):
        if modality in present:
            rows, values = present[modality]
            features[rows, offset : offset + dim] = values
            mask[rows, j] = 1.0
        offset += dim
    return features, mask


def branch_pixels(data: bytes | None, size: int, mean, std) -> np.ndarray:
    """A stored image as the image branch's input: 3 x size x size, normalized with the
    training data's statistics (zeros when the sample has no image)."""
    from PIL import Image

    if data is None:
        return np.zeros((3, size, size), np.float32)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR))
    x = (rgb.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def onnx_scorer(model: Path | str | bytes) -> Scorer:
    """Each task's scores (its output of the same name) from an ONNX file (a path, or its
    bytes) with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def score(batch: dict) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(None, {n: np.asarray(batch[n], np.float32) for n in names}),
                        strict=True))

    return score


def sample_vectors(encoders: dict, payloads: list[dict[str, bytes]], dtype: str
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[int, tuple[str, str]]]:
    """Vectors per modality for the samples (their payloads by modality) that have it, as the
    embedding stage makes them (a clip pooled over its frames; rounded to the cache's DTYPE,
    the precision training saw), and the samples an encoder could not read: i -> (modality,
    reason). Torch encoders or the bundle's alike."""
    from tessera.features.prepare import pooled_frames

    present, failed = {}, {}
    for modality, encoder in encoders.items():
        rows, items = [], []
        for i, sample in enumerate(payloads):
            payload = sample.get(modality)
            if payload is None or i in failed:
                continue
            try:
                items.append(encoder.prepare(payload))
                rows.append(i)
            except Exception as e:  # a member the encoder cannot read rejects its sample
                failed[i] = (modality, f"{modality} cannot be embedded: {e}")
        if not items:
            continue
        vectors = encoder.embed(items)
        if modality == "video":
            vectors = np.stack([pooled_frames(v, encoder.dim) for v in vectors])
        mask = np.zeros(len(payloads), bool)
        mask[rows] = True
        present[modality] = (mask, vectors.astype(dtype).astype(np.float32))
    return present, failed


def model_batch(meta: ModelMeta, payloads: list[dict[str, bytes]], present: dict) -> dict[str, np.ndarray]:
    """The served graph's inputs for these samples: packed vectors, mask and (when the model has
    an image branch) each sample's image as the branch's pixels."""
    features, mask = pack_vectors(len(payloads), meta.dims, present)
    batch = {"features": features, "mask": mask}
    if meta.image_branch_size:
        batch["pixels"] = np.stack([branch_pixels(sample.get("image"), meta.image_branch_size, meta.pixel_mean,
                                                  meta.pixel_std) for sample in payloads])
    return batch


def encoders_for(meta: ModelMeta, preprocess: dict, device: str = "cpu", bundle: Store | None = None,
                 variant: str = "fp32") -> dict:
    """The loaded encoders of the model's modalities, checked by identity against those it was
    trained with (preprocess.json): the BUNDLE folder's ONNX graphs of VARIANT (fp32 ones for
    a pruned head), or without one the torch encoders."""
    from tessera.features.config import EmbedConfig

    embed_cfg = EmbedConfig.model_validate(preprocess["embed"])
    if bundle is not None:
        from tessera.features.onnx_encoders import load_bundle
        from tessera.train.layout import BUNDLE_VARIANTS

        encoders = load_bundle(bundle, variant if variant in BUNDLE_VARIANTS else "fp32", meta.dims)
    else:
        from tessera.features.encoders import build_encoders  # torch

        built = build_encoders(embed_cfg)
        encoders = {m: built[m] for m in meta.dims}
    for modality, encoder in encoders.items():
        if encoder.identity() != preprocess["encoders"][modality]:
            raise ValueError(f"the {modality} encoder found here ({encoder.identity()}) is not the one the "
                             f"model was trained with ({preprocess['encoders'][modality]}): its weights differ")
        encoder.load(device, embed_cfg.precision)
    return encoders
