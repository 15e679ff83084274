"""A shard member's bytes as an encoder's input, and a clip's pooled vector: numpy, Pillow,
soundfile and PyAV only, shared by the torch encoders (features/encoders.py) and the ONNX
bundle's (features/onnx_encoders.py), so both see exactly the same inputs."""

from __future__ import annotations

import io

import numpy as np

from tessera.features.config import AudioEncoderConfig, ImageEncoderConfig
from tessera.preprocess.video import decode_frames


def text_input(payload: bytes) -> str:
    return payload.decode("utf-8")


def image_pixels(rgb: np.ndarray, cfg: ImageEncoderConfig) -> np.ndarray:
    """HxWx3 uint8 -> 3xSxS float32, resized and normalized as the model expects."""
    from PIL import Image

    size = cfg.image_size
    if rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
    x = (rgb.astype(np.float32) / 255.0 - np.float32(cfg.mean)) / np.float32(cfg.std)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def image_input(payload: bytes, cfg: ImageEncoderConfig) -> np.ndarray:
    from PIL import Image

    return image_pixels(np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")), cfg)


def video_input(payload: bytes, cfg: ImageEncoderConfig) -> np.ndarray:
    """T x 3 x S x S: each sampled frame as the image encoder's input."""
    return np.stack([image_pixels(frame, cfg) for frame in decode_frames(payload)])


def audio_input(payload: bytes, cfg: AudioEncoderConfig) -> tuple[np.ndarray, int]:
    """(zero-padded normalized samples, number of real samples)."""
    import soundfile as sf
    import soxr

    samples, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)
    if rate != cfg.sample_rate:
        samples = soxr.resample(samples, rate, cfg.sample_rate)
    samples = samples[: int(cfg.max_seconds * cfg.sample_rate)]
    # zero mean, unit variance: what Wav2Vec2FeatureExtractor does before the model
    samples = (samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)
    bucket = int(cfg.bucket_seconds * cfg.sample_rate)
    padded = np.zeros(max(1, -(-len(samples) // bucket)) * bucket, np.float32)
    padded[: len(samples)] = samples
    return padded, len(samples)


def by_length(items: list[tuple[np.ndarray, int]]) -> list[list[int]]:
    """Indices of the prepared clips grouped by padded length: the batches a model runs."""
    groups: dict[int, list[int]] = {}
    for i, (padded, _) in enumerate(items):
        groups.setdefault(len(padded), []).append(i)
    return list(groups.values())


def pooled_frames(frames: np.ndarray, dim: int) -> np.ndarray:
    """A clip's vector: the mean of its frames' vectors (cached flat, T x D)."""
    return frames.reshape(-1, dim).mean(0)


def per_clip(per_frame: np.ndarray, clips: list[np.ndarray]) -> list[np.ndarray]:
    """The frame vectors of a batch of clips, split back per clip and flattened (T x D)."""
    counts = [len(clip) for clip in clips]
    return [v.reshape(-1) for v in np.split(per_frame, np.cumsum(counts)[:-1])]
