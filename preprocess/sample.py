"""One manifest row + its raw bytes -> one WebDataset record, or a Reject. No I/O here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from preprocess.audio import process_audio
from preprocess.config import MODALITIES, ShardConfig
from preprocess.image import process_image
from preprocess.layout import IMAGE_MEMBER, VIDEO_MEMBER
from preprocess.manifest import ManifestRow
from preprocess.reject import Reject
from preprocess.text import check_words, decode_text, normalize_text
from preprocess.video import process_video


@dataclass
class SampleOutput:
    record: dict[str, bytes | str]  # __key__ (str), then WebDataset members (bytes) by extension
    modalities: tuple[str, ...]
    members: dict[str, str] = field(default_factory=dict)  # modality -> its member's extension
    pixel_histogram: list[int] | None = None
    audio_rms_db: float | None = None
    text_chars: int | None = None
    image_phash: int | None = None

    def payload(self, modality: str) -> bytes | None:
        ext = self.members.get(modality)
        return None if ext is None else self.record[ext]

    @property
    def stored_bytes(self) -> int:
        return sum(len(v) for k, v in self.record.items() if k != "__key__")


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """Per-sample randomness from (seed, key): independent of order, worker and shard."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _text(row: ManifestRow, raw: dict[str, bytes], cfg: ShardConfig, meta: dict) -> str | None:
    if row.text is not None:
        text = row.text
    elif "text" in raw:
        text, repair = decode_text(raw["text"], cfg.text)
        meta.update(repair)
    else:
        return None
    normalized, norm_meta = normalize_text(text, cfg.text)
    meta.update(norm_meta)
    if normalized is None:
        meta["empty"] = True  # whitespace-only text is no text
    else:
        check_words(normalized, cfg.text)
    return normalized


def process_sample(row: ManifestRow, raw: dict[str, bytes], cfg: ShardConfig) -> SampleOutput:
    """raw holds the bytes of each file the row names, by modality."""
    rng = sample_rng(cfg.seed, row.source_key)
    out = SampleOutput({"__key__": row.key}, ())
    meta: dict = {"source_key": row.source_key, "label": row.label, "line": row.line}
    if row.metadata:
        meta["metadata"] = row.metadata
    if row.targets:
        meta["targets"] = row.targets
    text_meta: dict = {}
    text = _text(row, raw, cfg, text_meta)
    if text is not None:
        out.record["txt"] = text.encode()
        out.members["text"] = "txt"
        out.text_chars = len(text)
    if text_meta:
        meta["text"] = text_meta
    if "image" in raw:
        image = process_image(raw["image"], cfg.image, rng, phash=cfg.near_dedup.image.max_distance is not None)
        out.image_phash = image.phash
        ext = IMAGE_MEMBER[cfg.image.output_format]
        out.record[ext] = image.data
        out.members["image"] = ext
        out.pixel_histogram = image.histogram
        meta["image"] = image.meta
    if "audio" in raw:
        audio = process_audio(raw["audio"], cfg.audio)
        out.record[cfg.audio.output_format] = audio.data
        out.members["audio"] = cfg.audio.output_format
        out.audio_rms_db = audio.rms_db
        meta["audio"] = audio.meta
    if "video" in raw:
        video = process_video(raw["video"], cfg.video)
        ext = VIDEO_MEMBER[cfg.video.encoding]
        out.record[ext] = video.data
        out.members["video"] = ext
        meta["video"] = video.meta
    out.modalities = tuple(m for m in MODALITIES if m in out.members)
    present = set(out.modalities)
    missing = [m for m in cfg.required_modalities if m not in present]
    if missing:
        raise Reject(missing[0], f"required modality {missing[0]} is empty after normalization")
    if not out.modalities:
        raise Reject(None, "sample has no modality left after normalization")
    if cfg.labels is not None and row.label is not None:
        out.record["cls"] = str(cfg.labels.index(row.label)).encode()
    meta["modalities"] = list(out.modalities)
    out.record["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
    return out
