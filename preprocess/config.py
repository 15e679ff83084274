"""Typed settings of the shard stage. Every field is validated before any work starts."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from tessera.core.config import Strict
from tessera.preprocess.modality import MODALITIES

Modality = Literal[MODALITIES]  # the registry's names (preprocess/modality.py)


class AugmentConfig(Strict):
    """Seeded per-sample image augmentation; each transform can be switched off."""

    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    rotate_degrees: float = Field(0.0, ge=0, le=180)
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.0, ge=0, le=64, description="Gaussian noise sigma in 8-bit levels")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        return self


class ImageConfig(Strict):
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    max_pixels: int = Field(40_000_000, gt=0, description="decompression-bomb limit, width x height")
    min_side: int = Field(8, ge=1)
    size: int = Field(224, gt=0)
    resize: Literal["crop", "keep_ratio", "none"] = "crop"
    background: tuple[int, int, int] = (255, 255, 255)
    output_format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = Field(90, ge=1, le=100)
    augment: AugmentConfig = AugmentConfig()
    max_aspect_ratio: float | None = Field(None, ge=1, description="longer / shorter side; null: any")


class TextConfig(Strict):
    # Decoders tried, in order, when a text file is not UTF-8; empty = reject it.
    repair_encodings: tuple[str, ...] = ()
    max_chars: int = Field(4096, gt=0)
    on_too_long: Literal["reject", "truncate"] = "reject"
    # word bounds of the normalized text (null: none)
    min_words: int | None = Field(None, ge=1)
    max_words: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _words(self) -> TextConfig:
        if self.min_words and self.max_words and self.min_words > self.max_words:
            raise ValueError(f"text.min_words ({self.min_words}) is over text.max_words ({self.max_words})")
        return self


class AudioConfig(Strict):
    formats: tuple[str, ...] = ("WAV", "FLAC", "OGG")
    sample_rate: int = Field(16_000, ge=1000)
    max_seconds: float = Field(30.0, gt=0)
    min_seconds: float | None = Field(None, gt=0, description="shorter clips are rejects; null: any")
    on_too_long: Literal["reject", "truncate"] = "truncate"
    normalize: Literal["peak", "rms", "none"] = "peak"
    target_db: float = Field(-1.0, le=0, description="peak or RMS level after normalization, dBFS")
    output_format: Literal["flac", "wav"] = "flac"


class VideoConfig(Strict):
    max_seconds: float = Field(120.0, gt=0)
    min_seconds: float | None = Field(None, gt=0, description="shorter videos are rejects; null: any")
    max_frames: int = Field(10_000, gt=0, description="frames in the stream, checked before decoding")
    max_decode_seconds: float = Field(20.0, gt=0)
    frames: int = Field(8, gt=0)
    fps: float = Field(4.0, gt=0, description="rate at which the frames are sampled")
    size: int = Field(112, gt=0)
    # mp4: H.264 at this CRF (18: visually lossless); frames: raw uint8 frames (.npy), exact but large
    encoding: Literal["mp4", "frames"] = "mp4"
    crf: int = Field(18, ge=0, le=51)

    @model_validator(mode="after")
    def _even(self) -> VideoConfig:
        if self.encoding == "mp4" and self.size % 2:
            raise ValueError(f"video.size must be even for H.264 (yuv420p), got {self.size}")
        return self


class TargetConfig(Strict):
    """A training target carried by a manifest field besides `label` (multi-task training):
    checked like `label` (a bad value is a reject line naming the field), recorded in the index."""

    field: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Literal["classification", "multilabel", "regression"]
    labels: tuple[str, ...] | None = Field(None, description="allowed values (classification, multilabel)")

    @model_validator(mode="after")
    def _fits(self) -> TargetConfig:
        if self.field in ("key", "label", "text", "text_file", "image", "audio", "video"):
            raise ValueError(f"targets: {self.field!r} is a manifest field of its own, not a target")
        if self.kind == "regression" and self.labels is not None:
            raise ValueError(f"targets: {self.field} is a regression target: it takes no labels")
        return self


class InputsConfig(Strict):
    """Where a manifest's inputs may be read from, besides the manifest's own folder or bucket
    prefix: absolute paths and URL prefixes (`s3://bucket/images/`, `https://cdn.example.com/`;
    a bare `https://` allows every host). Any other input is a reject line, never read."""

    allow: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _roots(self) -> InputsConfig:
        for root in self.allow:
            if not (root.startswith("/") or "://" in root):
                raise ValueError(f"inputs.allow entries are absolute paths or URLs with a protocol, got {root!r}")
        return self


class NearImageConfig(Strict):
    """Images whose 64-bit pHash differ in at most max_distance bits are near copies (null: off).
    The candidate join grows with the distance: up to ~6 it stays near-linear (docs/curation.md)."""

    max_distance: int | None = Field(None, ge=0, le=16)


class NearTextConfig(Strict):
    """Texts whose MinHash-estimated Jaccard similarity of character shingles is at least
    threshold are near copies (null: off). Bands and rows default to datasketch's optimum for
    the threshold weighted towards recall (candidates are verified on the whole signature)."""

    threshold: float | None = Field(None, gt=0, le=1)
    with_media: bool = Field(False, description="compare the captions of media samples too")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_chars: int = Field(5, ge=1, le=64, description="character n-grams: short captions need short ones")
    bands: int | None = Field(None, ge=1, description="LSH bands (rows = num_perm // bands); null: optimum")


class NearDedupConfig(Strict):
    image: NearImageConfig = NearImageConfig()
    text: NearTextConfig = NearTextConfig()


# named VOI windows (center, width) in Hounsfield units, as radiology viewers preset them
WINDOW_PRESETS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (400.0, 1800.0),
                  "brain": (40.0, 80.0), "abdomen": (40.0, 400.0), "liver": (60.0, 160.0)}
# the DICOM attributes a sample keeps by default: how the picture was made, never who or where
SAFE_DICOM_ATTRIBUTES = ("Modality", "BodyPartExamined", "ViewPosition", "PixelSpacing", "SliceThickness",
                         "PhotometricInterpretation", "BitsStored", "Rows", "Columns", "ManufacturerModelName",
                         "ImagerPixelSpacing", "SpacingBetweenSlices", "KVP", "ImageType")


class MedicalConfig(Strict):
    """DICOM and NIfTI in the image field (docs/medical.md): how pixels are windowed to 8 bits,
    what of the file is kept, how identifiers are replaced."""

    window: Literal["file", "auto", "lung", "mediastinum", "bone", "brain", "abdomen", "liver"] | \
        tuple[float, float] = Field("file", description="file: the file's first VOI window, else auto; auto: "
                                    "the 0.5-99.5th percentiles; a preset; or [center, width]")
    # keyed hashes replace the patient and study identifiers; its value is never written anywhere
    # (model dumps show it masked; the shard config digest takes it in)
    id_salt: SecretStr | None = None
    allow_burned_in: bool = Field(False, description="keep DICOM files that say text is burned into the pixels")
    keep: tuple[str, ...] = Field(SAFE_DICOM_ATTRIBUTES, description="the DICOM attributes (keywords) kept in "
                                  "the sample json; anything else is dropped")
    max_volume_bytes: int = Field(1 << 30, gt=0, description="a gzipped NIfTI's uncompressed limit")
    keep_raw: bool = Field(False, description="also store the slice's values before windowing (CT in Hounsfield "
                           "units) losslessly, as the member KEY.medical.npy")
    slices: Literal["middle", "all"] | int = Field("middle", description="of a volume or multi-frame file: the "
                                                   "middle slice as the row's sample; all: every slice; N: N evenly "
                                                   "spaced — each its own sample, keyed KEY/slice-NNN")

    @model_validator(mode="after")
    def _known(self) -> MedicalConfig:
        from pydicom.datadict import keyword_dict

        unknown = [k for k in self.keep if k not in keyword_dict]
        if unknown:
            raise ValueError(f"medical.keep: not DICOM keywords: {unknown}")
        if isinstance(self.window, tuple) and self.window[1] < 1:
            raise ValueError(f"medical.window: width must be >= 1, got {self.window[1]}")
        if isinstance(self.slices, int) and self.slices < 1:
            raise ValueError(f"medical.slices: middle, all or a count >= 1, got {self.slices}")
        return self


class ShardConfig(Strict):
    # shard i holds the manifest's i-th run of this many rows (what reaches the tar is fewer
    # when rows are rejected): boundaries are fixed before any input is read
    samples_per_shard: int = Field(256, gt=0)
    seed: int = 0
    dedup: bool = True
    near_dedup: NearDedupConfig = NearDedupConfig()
    required_modalities: tuple[Modality, ...] = ()
    labels: tuple[str, ...] | None = Field(None, description="allowed labels; null accepts any of label_type")
    label_type: Literal["str", "int"] = "str"
    require_label: bool = False
    # a manifest field whose value groups samples (a patient, a subject, a source recording): a
    # group's samples fall on one side of the train/validation split and in one cross-validation
    # fold; its value is written to the index as given (name a pseudonymous field). Without it,
    # a DICOM's keyed patient hash groups its samples.
    group_field: str | None = Field(None, min_length=1)
    image: ImageConfig = ImageConfig()
    text: TextConfig = TextConfig()
    audio: AudioConfig = AudioConfig()
    video: VideoConfig = VideoConfig()
    medical: MedicalConfig = MedicalConfig()
    inputs: InputsConfig = InputsConfig()
    targets: tuple[TargetConfig, ...] = ()
    # an input file larger than this is a reject, found before it is read (null: no limit)
    max_input_bytes: int | None = Field(512 << 20, gt=0)
    # a row's other fields (kept in its sample's json) larger than this, as JSON, make it a reject
    max_metadata_bytes: int = Field(1 << 20, gt=0)
    # a stage that rejects more than this share of its inputs writes everything, then fails (null: off)
    max_reject_fraction: float | None = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _distinct_targets(self) -> ShardConfig:
        fields = [t.field for t in self.targets]
        if len(set(fields)) != len(fields):
            raise ValueError(f"targets: each field once, got {fields}")
        return self

    def digest(self) -> str:
        """Hash of every setting that changes the shard bytes (max_reject_fraction is a check)."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"max_reject_fraction"}), sort_keys=True)
        if self.medical.id_salt is not None:  # the hashed ids change with it (its value is not in the dump)
            canonical += self.medical.id_salt.get_secret_value()
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
