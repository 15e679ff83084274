"""Manifest rows (JSONL or Parquet, any fsspec URL) -> validated rows or rejects."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from preprocess.config import MODALITIES, ShardConfig
from preprocess.keys import safe_key
from preprocess.reject import Reject
from preprocess.storage import filesystem, parent, resolve

FILE_FIELDS = {"image": "image", "audio": "audio", "video": "video", "text_file": "text"}
KNOWN_FIELDS = {"key", "label", "text", *FILE_FIELDS}


@dataclass(frozen=True)
class ManifestRow:
    line: int  # 1-based line (JSONL) or row number (Parquet)
    source_key: str
    key: str  # safe for tar and WebDataset
    label: str | int | None
    text: str | None  # inline caption; a text_file is in `files`
    files: dict[str, str]  # modality -> resolved URL
    metadata: dict = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        present = set(self.files) | ({"text"} if self.text is not None else set())
        return tuple(m for m in MODALITIES if m in present)


@dataclass(frozen=True)
class LineReject:
    line: int
    key: str | None
    modality: str | None
    reason: str

    def as_record(self) -> dict:
        return {"key": self.key, "line": self.line, "modality": self.modality, "reason": self.reason}


def read_records(url: str, storage_options: dict) -> Iterator[tuple[int, dict | str]]:
    """(line, object) per manifest row; a line that is not a JSON object comes as its error text."""
    fs, path = filesystem(url, storage_options)
    if path.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
        for number, row in enumerate(table.to_pylist(), start=1):
            yield number, {k: v for k, v in row.items() if v is not None}
        return
    with fs.open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield number, f"manifest line is not valid JSON: {e}"
                continue
            yield number, obj if isinstance(obj, dict) else f"manifest line is a {type(obj).__name__}, not an object"


def check_label(label: object, cfg: ShardConfig) -> str | int | None:
    if label is None:
        if cfg.require_label:
            raise Reject("label", "label is missing")
        return None
    if cfg.labels is not None:
        if not isinstance(label, str):
            raise Reject("label", f"label has the wrong type {type(label).__name__}, expected a string label")
        if label not in cfg.labels:
            raise Reject("label", f"label {label!r} is not in the label set")
        return label
    expected = str if cfg.label_type == "str" else int
    if isinstance(label, bool) or not isinstance(label, expected):
        raise Reject("label", f"label has the wrong type {type(label).__name__}, expected {cfg.label_type}")
    return label


def parse_row(obj: dict, line: int, base_dir: str, cfg: ShardConfig) -> ManifestRow:
    key = obj.get("key")
    if isinstance(key, bool) or not isinstance(key, str | int) or (isinstance(key, float) and math.isnan(key)):
        raise Reject(None, f"key is missing or not a string: {key!r}")
    key = str(key)
    if not key.strip():
        raise Reject(None, "key is empty")
    label = check_label(obj.get("label"), cfg)
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise Reject("text", f"text has the wrong type {type(text).__name__}, expected a string")
    if text is not None and "text_file" in obj:
        raise Reject("text", "both text and text_file are given")
    files = {}
    for name, modality in FILE_FIELDS.items():
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise Reject(modality, f"{name} must be a path, got {value!r}")
        files[modality] = resolve(base_dir, value)
    row = ManifestRow(line, key, safe_key(key), label, text, files,
                      {k: v for k, v in obj.items() if k not in KNOWN_FIELDS})
    if not row.modalities:
        raise Reject(None, "sample has no modality")
    missing = [m for m in cfg.required_modalities if m not in row.modalities]
    if missing:
        raise Reject(missing[0], f"required modality {missing[0]} is missing")
    return row


def read_manifest(url: str, cfg: ShardConfig, storage_options: dict) -> tuple[list[ManifestRow], list[LineReject]]:
    """All rows of a manifest, checked without reading any sample file.

    Duplicate keys (as given, or after making them safe) reject the later row."""
    base_dir = parent(url)
    rows: list[ManifestRow] = []
    rejects: list[LineReject] = []
    seen: dict[str, int] = {}
    for line, obj in read_records(url, storage_options):
        if isinstance(obj, str):
            rejects.append(LineReject(line, None, None, obj))
            continue
        raw_key = obj.get("key") if isinstance(obj.get("key"), str) else None
        try:
            row = parse_row(obj, line, base_dir, cfg)
        except Reject as r:
            rejects.append(LineReject(line, raw_key, r.modality, r.reason))
            continue
        if row.key in seen:
            rejects.append(LineReject(line, row.source_key, None, f"duplicate key (first on line {seen[row.key]})"))
            continue
        seen[row.key] = line
        rows.append(row)
    return rows, rejects
