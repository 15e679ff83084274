"""Manifests (JSONL or Parquet; one file, a folder or a glob of parts; any fsspec URL) ->
chunks of consecutive rows -> validated rows or rejects.

The driver never holds rows: it lists the manifest's files with their metadata (the
fingerprint an up-to-date run is recognised by) and cuts them into chunks — JSONL at line
boundaries found by a streaming scan, Parquet at row offsets from its footer — that tasks read."""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import io
import json
import logging
import math
import posixpath
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tessera.core.errors import NotAnInput
from tessera.core.storage import Store, absolute, file_tag, parent, resolve
from tessera.preprocess.config import MODALITIES, ShardConfig, TargetConfig
from tessera.preprocess.inputs import AllowedInputs
from tessera.preprocess.keys import safe_key
from tessera.preprocess.modality import file_fields
from tessera.preprocess.reject import Reject, unexpected

log = logging.getLogger(__name__)

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SCAN_BLOCK = 8 << 20  # bytes read at a time while finding JSONL line boundaries


@dataclass(frozen=True)
class ManifestFile:
    url: str
    name: str  # relative to the manifest's root: what reject lines and the dedup order use
    size: int
    tag: str  # changes when the file changes (ETag, version id or mtime)
    store: Store = field(compare=False, repr=False)  # the file itself, for reading it

    @property
    def root(self) -> str:
        """The manifest's root: the folder its inputs may lie in by default."""
        return self.url[: -len(self.name)].rstrip("/")

    @property
    def kind(self) -> str:
        return SUFFIXES[posixpath.splitext(self.url)[1]]


PARQUET_MAGIC = b"PAR1"


def _check_parquet(files: list[ManifestFile]) -> None:
    """Refuse (FileNotFoundError: not what a manifest reader reads) a `.parquet` file that does not
    end as Parquet does, before anything starts: its last 4 bytes only, read concurrently."""
    def tail(f: ManifestFile) -> bytes:
        return f.store.read_bytes(start=max(f.size - len(PARQUET_MAGIC), 0)) if f.size else b""

    with ThreadPoolExecutor(min(16, len(files)) or 1) as pool:
        for f, end in zip(files, pool.map(tail, files), strict=True):
            if end != PARQUET_MAGIC:
                raise NotAnInput(f"{f.url} is not a Parquet file (it does not end in {PARQUET_MAGIC!r}): "
                                        "give manifests as JSONL (.jsonl, .json) or Parquet (.parquet)")


@dataclass(frozen=True)
class ManifestSource:
    """The files of a manifest in their order (sorted by name), from metadata only."""

    url: str
    files: tuple[ManifestFile, ...]

    @classmethod
    def open(cls, url: str, store: Store) -> ManifestSource:
        """The manifest at URL — one file, a folder of parts or a glob — through STORE's options."""
        url = absolute(url)
        here = store.at(url)
        if re.search(r"[*?[]", url):
            root = store.at(re.split(r"[*?[]", url, maxsplit=1)[0].rsplit("/", 1)[0])
            infos = root.infos(url[len(root.url) + 1:])
        elif here.isdir():
            root, infos = here, here.infos()
        else:
            root = store.at(parent(url))
            infos = {url.rsplit("/", 1)[-1]: here.info()}
        names = sorted(name for name in infos if posixpath.splitext(name)[1] in SUFFIXES)
        if not names:
            raise NotAnInput(f"no manifest at {url} (JSONL or Parquet files: {', '.join(SUFFIXES)})")
        files = tuple(ManifestFile(root.url_of(name), name, int(infos[name]["size"]), file_tag(infos[name]),
                                   root.child(name)) for name in names)
        _check_parquet([f for f in files if f.kind == "parquet"])
        return cls(url, files)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\0{f.size}\0{f.tag}\0".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"url": self.url, "fingerprint": self.fingerprint,
                "files": [{"name": f.name, "size": f.size, "tag": f.tag} for f in self.files]}


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows of one manifest file: bytes [start, stop) of a JSONL file (whole
    lines), or rows [start, stop) of a Parquet file; first_line is the first row's number."""

    file: ManifestFile
    start: int
    stop: int
    first_line: int


def _jsonl_chunks(f: ManifestFile, rows: int) -> Iterator[Chunk]:
    """Cut at every ROWS-th line, streaming the file block by block (memory: one block)."""
    start, line, seen, offset = 0, 1, 0, 0
    with f.store.open() as stream:
        while block := stream.read(SCAN_BLOCK):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)  # newline positions
            cuts = ends[rows - seen - 1 :: rows]
            for end in cuts:
                stop = offset + int(end) + 1
                yield Chunk(f, start, stop, line)
                start, line = stop, line + rows
            seen = (seen + len(ends)) % rows
            offset += len(block)
    if start < f.size:
        yield Chunk(f, start, f.size, line)


def _parquet_chunks(f: ManifestFile, rows: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq  # (here: predict and the edge runtime import no pyarrow for JSONL)

    with f.store.open() as stream:
        total = pq.ParquetFile(stream).metadata.num_rows
    for start in range(0, total, rows):
        yield Chunk(f, start, min(start + rows, total), start + 1)


def chunks(source: ManifestSource, rows: int) -> Iterator[Chunk]:
    """The manifest as chunks of at most ROWS lines, file after file, lazily."""
    for f in source.files:
        cut = _parquet_chunks if f.kind == "parquet" else _jsonl_chunks
        yield from cut(f, rows)


def _parquet_rows(chunk: Chunk) -> Iterator[dict]:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    with chunk.file.store.open() as stream:
        pf = pq.ParquetFile(stream)
        bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups = [i for i in range(pf.num_row_groups) if bounds[i] < chunk.stop and bounds[i + 1] > chunk.start]
        position = int(bounds[groups[0]]) if groups else chunk.start
        for batch in pf.iter_batches(row_groups=groups, batch_size=4096):
            lo, hi = max(chunk.start - position, 0), min(chunk.stop - position, batch.num_rows)
            if hi > lo:
                yield from batch.slice(lo, hi - lo).to_pylist()
            position += batch.num_rows
            if position >= chunk.stop:
                return


def raw_records(chunk: Chunk) -> Iterator[tuple[int, bytes | dict]]:
    """(line, row) per row of the chunk: a JSONL line's bytes, or a Parquet row's fields."""
    if chunk.file.kind == "parquet":
        for number, row in enumerate(_parquet_rows(chunk), start=chunk.first_line):
            yield number, {k: v for k, v in row.items() if v is not None}
        return
    data = chunk.file.store.read_bytes(start=chunk.start, end=chunk.stop)
    for number, raw in enumerate(io.BytesIO(data), start=chunk.first_line):
        if raw.strip():
            yield number, raw


def read_chunk(chunk: Chunk) -> Iterator[tuple[int, dict | Reject]]:
    """(line, object) per row of the chunk; a line that is not a JSON object comes as its Reject."""
    for number, row in raw_records(chunk):
        yield number, row if isinstance(row, dict) else parse_json_line(row)


class _NumberTooLong(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > sys.get_int_max_str_digits():
        raise _NumberTooLong(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


# a JSON escape of a UTF-16 surrogate: json.loads takes a lone one as a character no encoder
# writes, so a line that has one is looked at closely
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: object) -> str | None:
    """The first string of VALUE (keys too) that cannot be written as UTF-8, escaped; else None."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as e:
                return item[e.start : e.end].encode("unicode_escape").decode()
    return None


def parse_json_line(raw: bytes) -> dict | Reject:
    """A manifest line's object, or why it is none (the Reject its line becomes)."""
    try:
        obj = json.loads(raw, parse_int=_bounded_int)
    except json.JSONDecodeError as e:  # e.msg without "line 1 column 5 (char 4)": the reject has the line
        return Reject("manifest.not_json", f"manifest line is not valid JSON: {e.msg} at character {e.pos + 1}")
    except UnicodeDecodeError as e:
        return Reject("manifest.not_json", f"manifest line is not valid JSON: not UTF-8 ({e.reason} at byte "
                                           f"{e.start + 1})")
    except _NumberTooLong as e:
        return Reject("manifest.number_too_long", f"manifest line holds {e}, over {sys.get_int_max_str_digits()}")
    except RecursionError:
        return Reject("manifest.too_deep", "manifest line is nested too deeply")
    if not isinstance(obj, dict):
        return Reject("manifest.not_object", f"manifest line is a {type(obj).__name__}, not an object")
    if _SURROGATE_ESCAPE.search(raw):
        lone = _lone_surrogate(obj)
        if lone is not None:
            return Reject("manifest.lone_surrogate", f"manifest line holds a lone UTF-16 surrogate ({lone}): "
                                                     "not a character")
    return obj


def json_safe(value: object) -> object:
    """VALUE as JSON holds it, for metadata kept from a manifest row: NaN and infinities as null
    (not JSON), times and dates in ISO 8601, durations in seconds, decimals as their exact text,
    bytes in base64, tuples as lists, mapping keys as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise Reject("metadata.not_json", f"metadata holds a {type(value).__name__}, which has no JSON form")


@dataclass(frozen=True)
class ManifestRow:
    line: int  # 1-based line (JSONL) or row number (Parquet) in its manifest file
    source_key: str
    key: str  # safe for tar and WebDataset
    label: str | int | None
    text: str | None  # inline caption; a text_file is in `files`
    files: dict[str, str]  # modality -> resolved URL
    metadata: dict = field(default_factory=dict)
    file: str = ""  # the manifest file, relative to the manifest's root
    targets: dict = field(default_factory=dict)  # shard.targets' fields present in the row, checked
    group: str | None = None  # shard.group_field's value: the split group

    @property
    def modalities(self) -> tuple[str, ...]:
        present = set(self.files) | ({"text"} if self.text is not None else set())
        return tuple(m for m in MODALITIES if m in present)

    def rejected(self, reject: Reject) -> LineReject:
        """This row's reject line for REJECT."""
        return LineReject.of(self.line, self.source_key, reject, self.file, self.key)


@dataclass(frozen=True)
class LineReject:
    """A manifest row that ends in the reject report (a row of REJECT_SCHEMA)."""

    line: int  # 1-based line (JSONL) or row number (Parquet) in its manifest file
    key: str | None  # as the manifest gave it (None: the line is not JSON, or has no string key)
    code: str  # preprocess/reject.py: CODES
    reason: str
    modality: str | None = None
    file: str = ""
    sample_key: str | None = None  # the safe key, once the row parsed

    @classmethod
    def of(cls, line: int, key: str | None, reject: Reject, file: str = "", sample_key: str | None = None
           ) -> LineReject:
        return cls(line, key, reject.code, reject.reason, reject.modality, file, sample_key)

    def as_record(self) -> dict:
        return {"key": self.key, "sample_key": self.sample_key, "file": self.file, "line": self.line,
                "modality": self.modality, "code": self.code, "reason": self.reason}


def _read_error(url: str, err: Exception, modality: str) -> Reject:
    if isinstance(err, FileNotFoundError):
        return Reject("input.not_found", f"file not found: {url}", modality)
    return Reject("input.unreadable", f"cannot read {url}: {type(err).__name__}: {err}", modality)


def fetch_batch(rows: list[ManifestRow], inputs: Store, limit: int | None
                ) -> list[tuple[ManifestRow, dict[str, bytes] | LineReject]]:
    """Raw bytes of every file of each row (by modality), read through the INPUTS store's
    options, or the row's read reject; a file over LIMIT bytes is one, and is not read past it."""
    got = inputs.read_many([url for row in rows for url in row.files.values()], limit)
    out = []
    for row in rows:
        raw: dict[str, bytes] = {}
        failure = None
        for modality, url in row.files.items():
            data = got[url]
            if isinstance(data, Exception):
                failure = row.rejected(_read_error(url, data, modality))
                break
            if not data:
                failure = row.rejected(Reject("input.empty", "empty file", modality))
                break
            if limit is not None and len(data) > limit:
                failure = row.rejected(Reject("input.too_large", f"file too large: {url} is {inputs.at(url).size()} "
                                              f"bytes, over shard.max_input_bytes ({limit})", modality))
                break
            raw[modality] = data
        out.append((row, failure or raw))
    return out


def check_label(label: object, cfg: ShardConfig) -> str | int | None:
    if label is None:
        if cfg.require_label:
            raise Reject("label.missing", "label is missing")
        return None
    if cfg.labels is not None:
        if not isinstance(label, str):
            raise Reject("label.wrong_type",
                         f"label has the wrong type {type(label).__name__}, expected a string label")
        if label not in cfg.labels:
            raise Reject("label.unknown", f"label {label!r} is not in the label set")
        return label
    expected = str if cfg.label_type == "str" else int
    if isinstance(label, bool) or not isinstance(label, expected):
        raise Reject("label.wrong_type", f"label has the wrong type {type(label).__name__}, expected {cfg.label_type}")
    return label


def check_target(value: object, target: TargetConfig) -> object:
    """A target field's value as recorded (None: missing, which masks that task for the sample)."""
    if value is None:
        return None
    field, kind = target.field, target.kind
    if kind == "regression":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise Reject("target.invalid", f"target {field}: {value!r} is not a finite number")
        return float(value)
    values = value if kind == "multilabel" else [value]
    if kind == "multilabel" and not isinstance(value, list):
        raise Reject("target.invalid", f"target {field}: expected a list of labels, got {type(value).__name__}")
    for v in values:
        if not isinstance(v, str):
            raise Reject("target.invalid", f"target {field}: label {v!r} is not a string")
        if target.labels is not None and v not in target.labels:
            raise Reject("target.invalid", f"target {field}: {v!r} is not in its label set")
    if kind == "multilabel" and len(set(values)) != len(values):
        raise Reject("target.invalid", f"target {field}: a label is repeated in {values!r}")
    return sorted(values) if kind == "multilabel" else value


def check_metadata(metadata: dict, cfg: ShardConfig) -> dict:
    """The row's other fields as each sample's json keeps them (json_safe), bounded like inputs."""
    if not metadata:
        return metadata
    kept = json_safe(metadata)
    size = len(json.dumps(kept, ensure_ascii=False).encode())
    if size > cfg.max_metadata_bytes:
        raise Reject("metadata.too_large",
                     f"metadata is {size} bytes, over shard.max_metadata_bytes ({cfg.max_metadata_bytes})")
    return kept


def check_group(value, field: str) -> str:
    """shard.group_field's value as the split group: a non-empty string or an integer."""
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise Reject("group.missing", f"shard.group_field {field!r} is missing or not a non-empty string or "
                                      f"integer: {value!r}")
    return str(value)


def source_key(obj: dict) -> str | None:
    """The row's key as given, when it is a usable one (a non-empty string or an integer)."""
    key = obj.get("key")
    if isinstance(key, bool) or not isinstance(key, str | int):
        return None
    key = str(key)
    return key if key.strip() else None


def parse_row(obj: dict, line: int, base_dir: str, cfg: ShardConfig, file: str = "",
              allowed: AllowedInputs | None = None) -> ManifestRow:
    """A checked manifest row (no input read); paths resolved against BASE_DIR and, when
    ALLOWED is given, refused unless they lie under its roots."""
    key = source_key(obj)
    if key is None:
        raw = obj.get("key")
        raise Reject("key.missing",
                     "key is empty" if isinstance(raw, str) else f"key is missing or not a string: {raw!r}")
    label = check_label(obj.get("label"), cfg)
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise Reject("text.wrong_type", f"text has the wrong type {type(text).__name__}, expected a string")
    if text is not None and "text_file" in obj:
        raise Reject("text.both_given", "both text and text_file are given")
    files = {}
    fields = file_fields()
    for name, modality in fields.items():
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise Reject("input.bad_path", f"{name} must be a path, got {value!r}", modality)
        files[modality] = resolve(base_dir, value)
        refusal = allowed.refusal(files[modality]) if allowed else None
        if refusal:
            raise Reject("input.refused", f"{name}: {refusal}", modality)
    targets = {t.field: check_target(obj.get(t.field), t) for t in cfg.targets}
    group = check_group(obj.get(cfg.group_field), cfg.group_field) if cfg.group_field else None
    known = {"key", "label", "text", *fields, *targets}
    row = ManifestRow(line, key, safe_key(key), label, text, files,
                      check_metadata({k: v for k, v in obj.items() if k not in known}, cfg), file,
                      {k: v for k, v in targets.items() if v is not None}, group)
    if not row.modalities:
        raise Reject("sample.no_modality", "sample has no modality")
    missing = [m for m in cfg.required_modalities if m not in row.modalities]
    if missing:
        raise Reject("sample.missing_modality", f"required modality {missing[0]} is missing", missing[0])
    return row


def chunk_rows(chunk: Chunk, cfg: ShardConfig, confined: bool = True) -> Iterator[ManifestRow | LineReject]:
    """The chunk's rows, checked without reading any sample file; inputs confined to the
    manifest's root and cfg.inputs.allow unless CONFINED is false."""
    base_dir = parent(chunk.file.url)
    allowed = AllowedInputs.of(chunk.file.root, cfg.inputs.allow) if confined else None
    for line, obj in read_chunk(chunk):
        if isinstance(obj, Reject):
            yield LineReject.of(line, None, obj, chunk.file.name)
            continue
        key = obj.get("key") if isinstance(obj.get("key"), str) else None
        try:
            yield parse_row(obj, line, base_dir, cfg, chunk.file.name, allowed)
        except Reject as r:
            yield LineReject.of(line, key, r, chunk.file.name)
        except (RecursionError, ValueError, TypeError) as e:  # a row no check foresaw: its line, not the shard
            log.exception("unexpected error on line %d of %s", line, chunk.file.name)
            yield LineReject.of(line, key, unexpected(e), chunk.file.name)


def iter_manifest(url: str, cfg: ShardConfig, store: Store, rows_per_chunk: int = 4096, confined: bool = True
                  ) -> Iterator[ManifestRow | LineReject]:
    """Every row of a manifest in order, read through STORE's options, streamed in one process
    (prediction, benchmarks)."""
    for chunk in chunks(ManifestSource.open(url, store), rows_per_chunk):
        yield from chunk_rows(chunk, cfg, confined)
