"""One manifest row + its raw bytes -> its WebDataset record(s), or its reject line. No I/O here."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from tessera.core.keys import part_key
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.manifest import LineReject, ManifestRow
from tessera.preprocess.modality import MODALITIES, PROCESSING_ORDER, Stored, registry
from tessera.preprocess.reject import Reject, unexpected

log = logging.getLogger(__name__)


@dataclass
class SampleOutput:
    record: dict[str, bytes | str]  # __key__ (str), then WebDataset members (bytes) by extension
    modalities: tuple[str, ...]
    members: dict[str, str] = field(default_factory=dict)  # modality -> its member's extension
    pixel_histogram: list[int] | None = None
    audio_rms_db: float | None = None
    text_chars: int | None = None
    image_phash: int | None = None
    group: str | None = None  # the split group: shard.group_field's value, else a member's (DICOM patient)
    medical: str | None = None  # what a medical image is, for the statistics: "CT/CHEST", "MR", "nifti1"
    part_sha256: str | None = None  # one of several samples of its row: what sets it apart (its content id)

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


def process_sample(row: ManifestRow, raw: dict[str, bytes], cfg: ShardConfig) -> list[SampleOutput]:
    """RAW holds the bytes of each file the row names, by modality; each modality of the
    registry makes its member of them (preprocess/modality.py). One sample, or one per part when
    a modality makes several (a volume's slices), each keyed KEY/PART with the others' members."""
    rng = sample_rng(cfg.seed, row.source_key)
    made: dict[str, list[Stored]] = {}
    for name in PROCESSING_ORDER:
        stored = registry()[name].process(row, raw, cfg, rng)
        if stored is not None:
            made[name] = stored if isinstance(stored, list) else [stored]
    parts = max((len(s) for s in made.values()), default=1)
    return [_sample(row, {name: s[i] if len(s) > 1 else s[0] for name, s in made.items()}, cfg)
            for i in range(parts)]


def _sample(row: ManifestRow, made: dict[str, Stored], cfg: ShardConfig) -> SampleOutput:
    """The sample of what each modality MADE of the row (at most one of them a part)."""
    part = next((s.part for s in made.values() if s.part is not None), None)
    out = SampleOutput({"__key__": row.key if part is None else part_key(row.key, part)}, ())
    meta: dict = {"source_key": row.source_key, "label": row.label, "line": row.line}
    if part is not None:
        meta["part"] = part
        out.part_sha256 = next(s.part_sha256 for s in made.values() if s.part is not None)
    if row.metadata:
        meta["metadata"] = row.metadata
    if row.targets:
        meta["targets"] = row.targets
    modalities = registry()
    for name, stored in made.items():
        if stored.meta:
            meta[name] = stored.meta
        if stored.data is not None:
            ext = modalities[name].member(cfg)
            out.record[ext] = stored.data
            out.members[name] = ext
        out.record.update(stored.extra)
        for statistic in ("pixel_histogram", "audio_rms_db", "text_chars"):
            if getattr(stored, statistic) is not None:
                setattr(out, statistic, getattr(stored, statistic))
        if stored.phash is not None:
            out.image_phash = stored.phash
        out.group = out.group or stored.group
    out.modalities = tuple(m for m in MODALITIES if m in out.members)
    present = set(out.modalities)
    missing = [m for m in cfg.required_modalities if m not in present]
    if missing:
        raise Reject("sample.missing_modality", f"required modality {missing[0]} is empty after normalization",
                     missing[0])
    if not out.modalities:
        raise Reject("sample.no_modality", "sample has no modality left after normalization")
    if cfg.labels is not None and row.label is not None:
        out.record["cls"] = str(cfg.labels.index(row.label)).encode()
    out.group = row.group or out.group
    medical = meta.get("image", {}).get("medical")
    if medical:
        out.medical = "/".join(str(medical[k]) for k in ("Modality", "BodyPartExamined") if medical.get(k)) \
            or medical["kind"]
    if out.group is not None:
        meta["split_group"] = out.group
    meta["modalities"] = list(out.modalities)
    out.record["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
    return out


def sample_or_reject(row: ManifestRow, raw: dict[str, bytes], cfg: ShardConfig) -> list[SampleOutput] | LineReject:
    """The one place a sample's failure becomes a reject line."""
    try:
        return process_sample(row, raw, cfg)
    except Reject as r:
        return row.rejected(r)
    except Exception as e:  # a decoder bug must not take the shard down with it
        log.exception("unexpected error on %s (line %d)", row.source_key, row.line)
        return row.rejected(unexpected(e))
