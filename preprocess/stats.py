"""Dataset statistics gathered while sharding, mergeable across shards."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class DatasetStats:
    pixel_count: int = 0
    pixel_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixel_sumsq: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    audio_count: int = 0
    audio_db_sum: float = 0.0
    audio_db_sumsq: float = 0.0
    text_count: int = 0
    text_chars_sum: int = 0
    text_chars_max: int = 0

    def add_image(self, pixels: np.ndarray) -> None:
        flat = pixels.reshape(-1, 3).astype(np.float64) / 255.0
        self.pixel_count += len(flat)
        self.pixel_sum = (np.array(self.pixel_sum) + flat.sum(0)).tolist()
        self.pixel_sumsq = (np.array(self.pixel_sumsq) + np.square(flat).sum(0)).tolist()

    def add_audio(self, rms_db: float) -> None:
        self.audio_count += 1
        self.audio_db_sum += rms_db
        self.audio_db_sumsq += rms_db * rms_db

    def add_text(self, chars: int) -> None:
        self.text_count += 1
        self.text_chars_sum += chars
        self.text_chars_max = max(self.text_chars_max, chars)

    def merge(self, other: DatasetStats) -> DatasetStats:
        return DatasetStats(
            self.pixel_count + other.pixel_count,
            (np.add(self.pixel_sum, other.pixel_sum)).tolist(),
            (np.add(self.pixel_sumsq, other.pixel_sumsq)).tolist(),
            self.audio_count + other.audio_count,
            self.audio_db_sum + other.audio_db_sum,
            self.audio_db_sumsq + other.audio_db_sumsq,
            self.text_count + other.text_count,
            self.text_chars_sum + other.text_chars_sum,
            max(self.text_chars_max, other.text_chars_max),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DatasetStats:
        return cls(**d)

    def summary(self) -> dict:
        """Means and standard deviations that training normalizes with."""

        def mean_std(total, total_sq, n):
            if not n:
                return None, None
            mean = np.asarray(total) / n
            std = np.sqrt(np.maximum(np.asarray(total_sq) / n - mean**2, 0))
            return np.round(mean, 6).tolist(), np.round(std, 6).tolist()

        img_mean, img_std = mean_std(self.pixel_sum, self.pixel_sumsq, self.pixel_count)
        db_mean, db_std = mean_std(self.audio_db_sum, self.audio_db_sumsq, self.audio_count)
        return {
            "image": {"mean": img_mean, "std": img_std, "pixels": self.pixel_count},
            "audio": {"rms_db_mean": db_mean, "rms_db_std": db_std, "clips": self.audio_count},
            "text": {
                "chars_mean": round(self.text_chars_sum / self.text_count, 3) if self.text_count else None,
                "chars_max": self.text_chars_max,
                "texts": self.text_count,
            },
        }
