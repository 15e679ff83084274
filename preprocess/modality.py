"""The modality registry: what tessera knows of each modality, said once, by the modality's own
module (preprocess/text.py, image.py, audio.py, video.py end with their `MODALITY`):

- the manifest fields that carry it (a file's path; text also inline),
- how a sample's bytes become its stored member (read and bounded, decoded, normalized,
  augmented: `process`), and the member extension it is written as (and every extension a
  reader accepts),
- which encoder embeds it (features/encoders.py's registry kind),
- how the report and the service show it.

Everything else asks the registry (`registry()`, `MODALITIES`, `member_extensions`); adding a
modality is its module (with its config section on ShardConfig), its name in MODALITIES, and its
tests. The per-modality modules import this one; it imports them on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

# the modalities, in the order of the index's columns and of a sample's `modalities`
MODALITIES = ("image", "text", "audio", "video")
# the order a sample's modalities are processed in (text first: a caption's checks are cheapest)
PROCESSING_ORDER = ("text", "image", "audio", "video")


@dataclass
class Stored:
    """What a modality made of one sample: its member's bytes (None: nothing to store, e.g. a
    caption that was only whitespace), its entry in the sample's json, and what the dataset
    statistics and near dedup take of it."""

    data: bytes | None
    meta: dict
    pixel_histogram: list[int] | None = None  # image: 3 x 256 counts of the stored pixels
    phash: int | None = None  # image: of the upright picture (near dedup), when asked for
    audio_rms_db: float | None = None  # audio: level after normalization
    text_chars: int | None = None  # text: characters after normalization
    group: str | None = None  # the split group the member says it is of (a DICOM's patient hash)
    extra: dict[str, bytes] = field(default_factory=dict)  # members besides its own, by extension
    # one of several parts its input made (a volume's slices: shard.medical.slices), each its own
    # sample keyed KEY/PART; and the digest of what sets it apart from its input's other parts
    part: str | None = None
    part_sha256: str | None = None


@dataclass(frozen=True)
class Modality:
    name: str
    file_field: str  # the manifest field naming its file
    inline_field: str | None  # a manifest field holding it inline (text's caption), if any
    member: Callable[[Any], str]  # the shard config -> the member extension it is written as
    members: tuple[str, ...]  # every extension readers take it from, the first preferred
    # (row, raw, cfg, rng) -> its Stored, or one per part (image: a volume's slices), or None
    process: Callable[[Any, dict[str, bytes], Any, Any], Stored | list[Stored] | None]
    encoder: str  # the features/encoders.py registry kind that embeds it
    shown_as: str  # in the report and the service: "caption", "thumbnail", "audio player", "poster frames"
    served_inline: bool  # /predict takes it as base64 in the request's JSON (media), else as text

    def payload(self, sample: dict) -> bytes | None:
        """A WebDataset sample's payload of this modality (its first member extension present)."""
        return next((sample[ext] for ext in self.members if ext in sample), None)


@cache
def registry() -> dict[str, Modality]:
    """Every modality by name, in MODALITIES order (each module's `MODALITY`)."""
    found = {name: importlib.import_module(f"tessera.preprocess.{name}").MODALITY for name in MODALITIES}
    for name, modality in found.items():
        if modality.name != name:
            raise ValueError(f"tessera.preprocess.{name} declares the modality {modality.name!r}")
    return found


def member_extensions() -> dict[str, tuple[str, ...]]:
    """Modality -> the member extensions readers take it from."""
    return {name: m.members for name, m in registry().items()}


def file_fields() -> dict[str, str]:
    """Manifest field naming a file -> its modality."""
    return {m.file_field: name for name, m in registry().items()}
