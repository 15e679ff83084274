"""Audio bytes -> checked, mono, resampled, normalized, encoded audio."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from tessera.preprocess.config import AudioConfig
from tessera.preprocess.modality import Modality, Stored
from tessera.preprocess.reject import Reject

MIN_SECONDS = 0.05
SILENCE_LEVEL = 1e-6  # below this peak/RMS a clip is silence: no gain is applied
# source audio decoded past max_seconds, so that resampling near the cut sees what it would
# see in the whole clip (the resampler's filter is milliseconds long)
DECODE_MARGIN_S = 1.0


@dataclass
class AudioResult:
    data: bytes
    meta: dict
    rms_db: float  # level after normalization, for dataset statistics


def wav_truncation(data: bytes) -> str | None:
    """libsndfile silently reads a WAV whose data chunk is cut short; say so instead."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            held = len(data) - pos - 8
            if size != 0xFFFFFFFF and size > held:  # 0xFFFFFFFF: streamed, size unknown
                return f"audio truncated: data chunk declares {size} bytes, file holds {held}"
            return None
        pos += 8 + size + (size & 1)
    return "audio truncated: no data chunk"


def decode_audio(data: bytes, cfg: AudioConfig) -> tuple[np.ndarray, int, dict]:
    """Bytes -> (float32 mono samples, source rate, meta). The duration is read from the header
    first: a clip over max_seconds is rejected (on_too_long: reject) or decoded only up to it
    (and a margin), never whole."""
    if not data:
        raise Reject("input.empty", "empty file", "audio")
    truncation = wav_truncation(data)
    if truncation:
        raise Reject("audio.truncated", truncation)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.format not in cfg.formats:
                raise Reject("audio.format", f"format {f.format} not in the allowed formats {list(cfg.formats)}")
            rate, frames = f.samplerate, f.frames
            if frames / rate > cfg.max_seconds and cfg.on_too_long == "reject":
                raise Reject("audio.too_long", f"audio is {frames / rate:.1f} s, over {cfg.max_seconds} s")
            if cfg.min_seconds is not None and frames < cfg.min_seconds * rate:
                raise Reject("audio.too_short", f"audio is {frames / rate:.2f} s, under shard.audio.min_seconds "
                                      f"{cfg.min_seconds}")
            samples = f.read(min(frames, int((cfg.max_seconds + DECODE_MARGIN_S) * rate)), dtype="float32",
                             always_2d=True)
    except sf.LibsndfileError as e:
        raise Reject("audio.undecodable", f"audio cannot be decoded: {e}") from None
    if not np.isfinite(samples).all():
        bad = "NaN" if np.isnan(samples).any() else "Inf"
        raise Reject("audio.not_finite", f"audio contains {bad}")
    meta = {"source_rate": rate, "source_channels": samples.shape[1], "source_seconds": frames / rate}
    if frames < MIN_SECONDS * rate:
        raise Reject("audio.too_short", f"audio is {frames} samples long, under {MIN_SECONDS} s")
    return samples.mean(axis=1), rate, meta


def normalize_level(samples: np.ndarray, mode: str, target_db: float) -> tuple[np.ndarray, dict]:
    if mode == "none":
        return samples, {}
    level = float(np.max(np.abs(samples))) if mode == "peak" else float(np.sqrt(np.mean(samples**2)))
    if level < SILENCE_LEVEL:
        return samples, {"silent": True}
    gain = 10 ** (target_db / 20) / level
    # RMS normalization may push peaks over full scale; limit the gain so it never clips.
    peak = float(np.max(np.abs(samples)))
    gain = min(gain, 1.0 / peak)
    return samples * gain, {"gain_db": round(20 * np.log10(gain), 3)}


def process_audio(data: bytes, cfg: AudioConfig) -> AudioResult:
    samples, rate, meta = decode_audio(data, cfg)
    if rate != cfg.sample_rate:
        samples = soxr.resample(samples, rate, cfg.sample_rate, quality="HQ")
    max_samples = int(cfg.max_seconds * cfg.sample_rate)
    if len(samples) > max_samples:
        if cfg.on_too_long == "reject":
            raise Reject("audio.too_long", f"audio is {len(samples) / cfg.sample_rate:.1f} s, over {cfg.max_seconds} s")
        samples = samples[:max_samples]
        meta["truncated"] = True
    samples, level_meta = normalize_level(samples, cfg.normalize, cfg.target_db)
    meta.update(level_meta)
    samples = np.clip(samples, -1.0, 1.0)
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    buf = io.BytesIO()
    sf.write(buf, samples, cfg.sample_rate, format=cfg.output_format.upper(), subtype="PCM_16")
    meta.update(rate=cfg.sample_rate, seconds=round(len(samples) / cfg.sample_rate, 4))
    return AudioResult(buf.getvalue(), meta, 20 * np.log10(max(rms, 1e-10)))


def _stored(row, raw: dict[str, bytes], cfg, rng) -> Stored | None:
    if "audio" not in raw:
        return None
    audio = process_audio(raw["audio"], cfg.audio)
    return Stored(audio.data, audio.meta, audio_rms_db=audio.rms_db)


MODALITY = Modality("audio", file_field="audio", inline_field=None, member=lambda cfg: cfg.audio.output_format,
                    members=("flac", "wav"), process=_stored, encoder="wav2vec2", shown_as="audio player",
                    served_inline=True)
