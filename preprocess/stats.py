"""Dataset statistics gathered while sharding, mergeable across shards."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tessera.preprocess.sample import SampleOutput

LEVELS = np.arange(256, dtype=np.float64) / 255.0


@dataclass
class DatasetStats:
    # Per-channel 8-bit histograms (3 x 256 counts): exact, cheap to gather (Pillow counts
    # them in C) and to merge; means and deviations are derived from them.
    pixel_histogram: np.ndarray = field(default_factory=lambda: np.zeros(768, np.int64))
    audio_count: int = 0
    audio_db_sum: float = 0.0
    audio_db_sumsq: float = 0.0
    text_count: int = 0
    text_chars_sum: int = 0
    text_chars_max: int = 0
    medical: dict[str, int] = field(default_factory=dict)  # medical images by "MODALITY/BODY PART" (or kind)

    def add(self, sample: SampleOutput) -> None:
        """A written sample's figures: its stored pixels' histogram (Pillow's, RGB), audio level,
        text length, what medical image it is."""
        if sample.pixel_histogram is not None:
            self.pixel_histogram += sample.pixel_histogram
        if sample.audio_rms_db is not None:
            self.audio_count += 1
            self.audio_db_sum += sample.audio_rms_db
            self.audio_db_sumsq += sample.audio_rms_db * sample.audio_rms_db
        if sample.text_chars is not None:
            self.text_count += 1
            self.text_chars_sum += sample.text_chars
            self.text_chars_max = max(self.text_chars_max, sample.text_chars)
        if sample.medical is not None:
            self.medical[sample.medical] = self.medical.get(sample.medical, 0) + 1

    def merge(self, other: DatasetStats) -> DatasetStats:
        return DatasetStats(
            self.pixel_histogram + other.pixel_histogram,
            self.audio_count + other.audio_count,
            self.audio_db_sum + other.audio_db_sum,
            self.audio_db_sumsq + other.audio_db_sumsq,
            self.text_count + other.text_count,
            self.text_chars_sum + other.text_chars_sum,
            max(self.text_chars_max, other.text_chars_max),
            {k: self.medical.get(k, 0) + other.medical.get(k, 0) for k in sorted(self.medical.keys() | other.medical)},
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "pixel_histogram": self.pixel_histogram.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetStats:
        return cls(**{**d, "pixel_histogram": np.asarray(d["pixel_histogram"], np.int64)})

    def summary(self) -> dict:
        """Means and standard deviations that training normalizes with."""

        def mean_std(total, total_sq, n):
            if not n:
                return None, None
            mean = np.asarray(total) / n
            std = np.sqrt(np.maximum(np.asarray(total_sq) / n - mean**2, 0))
            return np.round(mean, 6).tolist(), np.round(std, 6).tolist()

        counts = np.asarray(self.pixel_histogram, np.float64).reshape(3, 256)
        pixels = int(counts[0].sum())
        img_mean, img_std = mean_std(counts @ LEVELS, counts @ LEVELS**2, pixels)
        db_mean, db_std = mean_std(self.audio_db_sum, self.audio_db_sumsq, self.audio_count)
        return {
            "image": {"mean": img_mean, "std": img_std, "pixels": pixels},
            "audio": {"rms_db_mean": db_mean, "rms_db_std": db_std, "clips": self.audio_count},
            "text": {
                "chars_mean": round(self.text_chars_sum / self.text_count, 3) if self.text_count else None,
                "chars_max": self.text_chars_max,
                "texts": self.text_count,
            },
            "medical": dict(sorted(self.medical.items())),
        }


def medical_text(statistics: dict) -> str:
    """A shard output's medical images by modality and body part, as a result line ends
    ("; medical images: CT/CHEST 120, MR 4"), from its summary's statistics; "" when none."""
    counts = statistics.get("medical") or {}
    return "; medical images: " + ", ".join(f"{kind} {n}" for kind, n in counts.items()) if counts else ""
