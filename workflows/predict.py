"""`tessera predict`: an exported model on new raw data. Inputs go through the shard stage's
own per-sample code (fetch, validate, normalize: `fetch_batch`, `sample_or_reject`) and the
embedding stage's encoders (or, with --bundle, the export's ONNX encoders: no torch), then the
exported ONNX graph; a bad input gets the reason rejects.jsonl would give it. Inference never
augments and does not need labels."""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np

from tessera.core.errors import ConfigError, NotAnInput
from tessera.core.storage import Store
from tessera.features.config import EmbedConfig
from tessera.preprocess.config import AugmentConfig, NearDedupConfig, ShardConfig
from tessera.preprocess.manifest import LineReject, ManifestRow, fetch_batch, iter_manifest, parse_row
from tessera.preprocess.reject import Reject
from tessera.preprocess.sample import SampleOutput, sample_or_reject
from tessera.train.inputs import encoders_for, model_batch, onnx_scorer, sample_vectors
from tessera.train.layout import BUNDLE, META, ONNX, PREPROCESS, TRAIN_SUMMARY, ModelMeta
from tessera.train.tasks import tasks_from_meta
from tessera.workflows.config import FallbackConfig

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".jsonl", ".parquet")
FIELD_OF_SUFFIX = {**dict.fromkeys(("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"), "image"),
                   **dict.fromkeys(("wav", "flac", "ogg", "mp3"), "audio"),
                   **dict.fromkeys(("mp4", "webm", "mkv", "mov", "avi"), "video"), "txt": "text_file"}


class Predictor:
    """Loads an export folder (`tessera export`) once; predicts batches of manifest rows, whose
    inputs are read through the export's store options."""

    def __init__(self, model: Store, variant: str = "fp32", batch_size: int = 32, device: str = "cpu",
                 bundle: bool = False, fallback: FallbackConfig | None = None):
        """FALLBACK (with a url): the service the samples this model is not sure of go on to
        (workflows/service.py), for predict_rows; each record then says who answered it."""
        self.model = model
        if not (model.exists(META) and model.exists(PREPROCESS)):
            what = ("a training run, not an export" if model.exists(TRAIN_SUMMARY) else
                    "not an export (no model.json and preprocess.json)" if model.isdir() else "not there")
            raise NotAnInput(f"{model.url} is {what}: make one with `tessera export RUN {model.url}`")
        self.meta = ModelMeta.read(model)
        self.tasks = tasks_from_meta(self.meta.tasks)
        preprocess = model.read_json(PREPROCESS)
        if variant not in ONNX or not model.exists(ONNX[variant]):
            have = [v for v, f in ONNX.items() if model.exists(f)]
            raise ConfigError(f"{model.url} has no {variant!r} model; it has {have}"
                              + (" (export.prune_sparsity makes the pruned one)" if variant == "pruned" else ""))
        shard = ShardConfig.model_validate(preprocess["shard"])
        image = shard.image.model_copy(update={"augment": AugmentConfig()})
        # new data needs no label and no targets (a stray target value is not a reason to reject it),
        # no near-duplicate signatures (nothing is deduplicated), and is one answer per sample (a
        # volume's middle slice)
        medical = shard.medical.model_copy(update={"slices": "middle"})
        self.shard_cfg = shard.model_copy(update={"require_label": False, "targets": (), "image": image,
                                                  "near_dedup": NearDedupConfig(), "medical": medical})
        self.vector_dtype = EmbedConfig.model_validate(preprocess["embed"]).dtype  # the precision training saw
        self.encoders = encoders_for(self.meta, preprocess, device, model.child(BUNDLE) if bundle else None, variant)
        self.score = onnx_scorer(model.read_bytes(ONNX[variant]))
        self.batch_size = batch_size
        self.fallback = None
        if fallback is not None and fallback.url:
            from tessera.workflows.service import Fallback

            self.fallback = Fallback(fallback, self.tasks)

    def _record(self, scores: dict[str, np.ndarray], i: int) -> dict:
        """Sample i's prediction per task, and the class / tag probabilities behind it."""
        return {"predictions": {t.name: t.decode(scores[t.name][i]) for t in self.tasks},
                "scores": {t.name: dict(zip(t.labels, scores[t.name][i].tolist(), strict=True))
                           for t in self.tasks if t.kind != "regression"}}

    def prepare(self, row: ManifestRow, raw: dict[str, bytes] | LineReject) -> SampleOutput | LineReject:
        """A row and its raw bytes (or its read reject) -> the stored sample, or its reject: the
        decoding, before any model runs."""
        result = raw if isinstance(raw, LineReject) else sample_or_reject(row, raw, self.shard_cfg)
        if isinstance(result, LineReject):
            return result
        (sample,) = result  # (one per row: the middle slice of a volume)
        return sample

    def score_prepared(self, prepared: list[tuple[ManifestRow, SampleOutput | LineReject]]) -> list[dict]:
        """One record per prepared sample, in order: the prediction (encoders and the ONNX graph
        run once over the batch), or the reject with its reason."""
        outputs = [(i, row, out) for i, (row, out) in enumerate(prepared) if not isinstance(out, LineReject)]
        results: dict[int, dict] = {i: {"rejected": True, **out.as_record()}
                                    for i, (_, out) in enumerate(prepared) if isinstance(out, LineReject)}
        payloads = [{m: out.payload(m) for m in out.members} for _, _, out in outputs]
        present, failed = sample_vectors(self.encoders, payloads, self.vector_dtype)
        if outputs:
            scores = self.score(model_batch(self.meta, payloads, present))
            for n, (i, row, _) in enumerate(outputs):
                if n in failed:
                    modality, reason = failed[n]
                    reject = LineReject.of(row.line, row.source_key, Reject("request.not_embeddable", reason, modality),
                                           row.file, row.key)
                    results[i] = {"rejected": True, **reject.as_record()}
                else:
                    results[i] = {"key": row.source_key, "line": row.line, **self._record(scores, n)}
        return [results[i] for i in range(len(prepared))]

    def predict_rows(self, rows: list[ManifestRow]) -> Iterator[dict]:
        """One record per row, in order of lines: the prediction, or the reject with its reason."""
        for start in range(0, len(rows), self.batch_size):
            fetched = fetch_batch(rows[start : start + self.batch_size], self.model, self.shard_cfg.max_input_bytes)
            records = self.score_prepared([(row, self.prepare(row, raw)) for row, raw in fetched])
            if self.fallback is not None:
                for record in records:
                    if "predictions" in record:
                        record["served_by"] = "edge"
                self.fallback.settle([{} if isinstance(raw, LineReject) else request_sample(row, raw)
                                      for row, raw in fetched], records, set(self.meta.dims))
            yield from (r for _, r in sorted(zip((row.line for row, _ in fetched), records, strict=True),
                                             key=lambda pair: pair[0]))


def request_sample(row: ManifestRow, raw: dict[str, bytes]) -> dict:
    """A row and its files' bytes (by modality) as a /predict request's sample: media inline."""
    from tessera.workflows.service import MEDIA

    sample = {"key": row.source_key}
    text = row.text if row.text is not None else raw["text"].decode(errors="replace") if "text" in raw else None
    if text is not None:
        sample["text"] = text
    for field, modality in MEDIA.items():
        if modality in raw:
            sample[field] = base64.b64encode(raw[modality]).decode()
    return sample


def rows_from_files(paths: list[str], cfg: ShardConfig, store: Store) -> tuple[list, list[LineReject]]:
    """Raw files (or folders of them, read through STORE's options) as samples: files sharing
    a name stem are one sample, each file's type given by its suffix (.jpg image, .wav audio,
    .mp4 video, .txt caption). A sample's `line` is its first file's position among them, its
    `file` that file."""
    files: list[str] = []
    for path in paths:
        here = store.at(path)
        if here.isdir():
            files += sorted(here.url_of(name) for name in here.infos("*"))
        else:
            files.append(here.url)
    samples: dict[str, dict] = {}
    rejects = []
    for number, path in enumerate(files, start=1):
        name = PurePosixPath(path).name
        stem, _, suffix = name.partition(".")
        field = FIELD_OF_SUFFIX.get(suffix.lower())
        if field is None:
            rejects.append(LineReject.of(number, stem, Reject("request.unknown_file_type",
                                                              f"unknown file type .{suffix}"), path))
            continue
        sample = samples.setdefault(stem, {"key": stem, "_line": number, "_file": path})
        if field in sample:
            rejects.append(LineReject.of(number, stem, Reject("request.two_files", f"two {field} files for {stem}"),
                                         path))
            continue
        sample[field] = path
    rows = []
    for sample in samples.values():
        line, first = sample.pop("_line"), sample.pop("_file")  # a sample's rejects name its first file
        try:
            rows.append(parse_row(sample, line, "/", cfg, first))  # the paths are absolute
        except Reject as r:
            rejects.append(LineReject.of(line, sample["key"], r, first))
    return rows, rejects


def predict_inputs(predictor: Predictor, inputs: list[str]) -> Iterator[dict]:
    """Predictions for a manifest (one .jsonl / .parquet, streamed) or raw files; rejects
    included. Nothing is deduplicated: every input gets its line."""
    if len(inputs) == 1 and inputs[0].endswith(MANIFEST_SUFFIXES):
        # what the command line names is the user's own request: not confined like a batch job's manifest
        items = iter_manifest(inputs[0], predictor.shard_cfg, predictor.model, confined=False)
    else:
        rows, rejects = rows_from_files(inputs, predictor.shard_cfg, predictor.model)
        items = itertools.chain(rejects, rows)
    batch: list[ManifestRow] = []
    for item in items:
        if isinstance(item, LineReject):
            yield {"rejected": True, **item.as_record()}
            continue
        batch.append(item)
        if len(batch) == predictor.batch_size:
            yield from predictor.predict_rows(batch)
            batch = []
    yield from predictor.predict_rows(batch)
