"""A trained run as files to serve: the fp32 weights (safetensors) with model.json, the
settings that reproduce its inputs (preprocess.json), an ONNX graph of the model that
onnxruntime serves without tessera's training code, its dynamic int8 quantization and
optionally a magnitude-pruned variant; with export.bundle the encoders too, as ONNX
(train/bundle.py). Each variant's size and validation metrics go to export.json beside
fp32's, and the bundle's agreement with the torch encoders."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from tessera.core.engine import Stage, StageRun, execute
from tessera.core.lease import DEFAULT_LEASE, Fence, LeaseConfig
from tessera.core.storage import Store
from tessera.features.config import EmbedConfig
from tessera.features.layout import EmbedSummary
from tessera.preprocess.layout import SHARD_CONFIG
from tessera.train.bundle import check_bundle, validation_payloads, write_bundle
from tessera.train.config import ExportConfig
from tessera.train.evaluate import (
    METRICS,
    Scorer,
    TaskMetrics,
    data_for,
    eager_scorer,
    eval_batches,
    headline,
    trained_on,
)
from tessera.train.inputs import encoders_for, onnx_scorer
from tessera.train.layout import BUNDLE, META, ONNX, PREPROCESS, WEIGHTS, ExportSummary, ModelMeta
from tessera.train.losses import served
from tessera.train.model import MultimodalModel
from tessera.train.saved import load_model, read_saved
from tessera.train.tasks import Task, agreement

log = logging.getLogger(__name__)


class Serving(nn.Module):
    """The exported graph: packed embeddings (+ pixels) -> one output per task, named after it
    (class probabilities, tag probabilities, or the predicted number)."""

    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor | None = None):
        inputs = (features, mask) if pixels is None else (features, mask, pixels)
        return tuple(served(self.model.tasks, self.model(inputs)))


def to_onnx(model: MultimodalModel, path: Path) -> None:
    """ONNX via torch.export, the batch dimension left dynamic."""
    encoder = model.encoder
    args = [torch.zeros(2, sum(encoder.sizes)), torch.ones(2, len(encoder.sizes))]
    if encoder.image_branch is not None:
        size = model.cfg.image_branch_size
        args.append(torch.zeros(2, 3, size, size))
    batch = torch.export.Dim("batch")
    names = ["features", "mask", "pixels"][: len(args)]
    program = torch.onnx.export(Serving(model).eval(), tuple(args), dynamo=True, verbose=False,
                                dynamic_shapes={n: {0: batch} for n in names},
                                output_names=[t.name for t in model.tasks])
    program.save(str(path))


def samples_per_second(score: Scorer, batch: dict, seconds: float = 0.5) -> float:
    """Throughput of a scorer alone on one batch, repeated for at least SECONDS (3 runs at least)."""
    score(batch)  # warm-up: onnxruntime plans its kernels on the first run
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < seconds:
        score(batch)
        runs += 1
    return runs * len(batch["keys"]) / (time.perf_counter() - started)


def pruned(model: MultimodalModel, sparsity: float) -> MultimodalModel:
    """A copy with the smallest-magnitude SPARSITY share of all linear weights set to zero."""
    from torch.nn.utils import prune

    copied = copy.deepcopy(model)
    linears = [(m, "weight") for m in copied.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in linears:
        prune.remove(module, name)
    return copied


def compare_variants(batches: Iterable[dict], eager: Scorer, variants: dict[str, Scorer], tasks: Sequence[Task]
                     ) -> tuple[dict[str, dict], int]:
    """Per variant and task: its metrics, its largest score difference from the eager model (a
    regression value's in standard units) and how often it predicts what eager predicts; one
    pass over the batches."""
    metrics = {n: TaskMetrics(tasks) for n in variants}
    worst = {n: dict.fromkeys((t.name for t in tasks), 0.0) for n in variants}
    same = {n: dict.fromkeys((t.name for t in tasks), 0.0) for n in variants}
    samples = 0
    for batch in batches:
        reference = eager(batch)
        samples += len(batch["keys"])
        for name, score in variants.items():
            scores = score(batch)
            metrics[name].add(batch, scores)
            for task in tasks:
                mine, theirs = scores[task.name], reference[task.name]
                unit = task.scale if task.kind == "regression" else 1.0  # a number: in standard units
                worst[name][task.name] = max(worst[name][task.name], float(np.abs(mine - theirs).max()) / unit)
                same[name][task.name] += agreement(task, mine, theirs)
    result = {}
    for name, m in metrics.items():
        scored = m.result()
        result[name] = {"tasks": {t.name: {**headline(t, scored[t.name]),
                                           "max_abs_diff_vs_eager": worst[name][t.name] if samples else None,
                                           "same_prediction_as_eager": same[name][t.name] / samples if samples
                                           else None} for t in tasks}}
    return result, samples


def within_tolerance(tasks: Sequence[Task], variant: dict, reference: dict, tolerance: float) -> bool | None:
    """Whether every task's first headline metric (accuracy, micro-F1, R²) is at most TOLERANCE
    below the reference's; None when the validation set gave none."""
    checks = []
    for task in tasks:
        metric = METRICS[task.kind].HEADLINE[0]
        mine, theirs = variant["tasks"][task.name][metric], reference["tasks"][task.name][metric]
        if mine is not None and theirs is not None:
            checks.append(theirs - mine <= tolerance)
    return all(checks) if checks else None


def _onnx_files(model: MultimodalModel, folder: Path, cfg: ExportConfig) -> dict[str, Path]:
    """The model's ONNX variants written into FOLDER: fp32, and int8 / pruned as configured."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files = {"fp32": folder / ONNX["fp32"]}
    to_onnx(model, files["fp32"])
    if cfg.int8:
        files["int8"] = folder / ONNX["int8"]
        quantize_dynamic(str(files["fp32"]), str(files["int8"]), weight_type=QuantType.QInt8)
    if cfg.prune_sparsity:
        files["pruned"] = folder / ONNX["pruned"]
        to_onnx(pruned(model, cfg.prune_sparsity), files["pruned"])
    return files


def _metrics_only(tasks: dict[str, dict]) -> dict[str, dict]:
    """Per task, the metrics of a compare_variants entry without its comparison to eager."""
    return {t: {k: v for k, v in m.items() if k not in ("max_abs_diff_vs_eager", "same_prediction_as_eager")}
            for t, m in tasks.items()}


def _size(model: MultimodalModel, files: dict[str, Path]) -> dict:
    return {"parameters": sum(p.numel() for p in model.parameters()),
            **{f"bytes_{name}": path.stat().st_size for name, path in files.items() if name in ("fp32", "int8")}}


def _bundle(meta: ModelMeta, preprocess: dict, info, train_cfg, cfg: ExportConfig, folder: Path, heads: dict) -> dict:
    """The encoders as ONNX into FOLDER, checked against the torch encoders on validation samples."""
    encoders = encoders_for(meta, preprocess)
    write_bundle(encoders, folder, cfg.int8)
    payloads = validation_payloads(info, train_cfg.val_split, cfg.bundle_samples)
    return check_bundle(encoders, Store(str(folder)), meta, heads, info.tasks, payloads,
                        EmbedConfig.model_validate(preprocess["embed"]).dtype)


class ExportStage(Stage[ExportSummary]):
    """RUN's model and its variants into OUT (export.json last). A distilled run (train.
    distill_from) is reported beside its teacher: size, metrics per task, agreement, ONNX
    throughput (the teacher's files stay in scratch). On the driver: no Ray work."""

    command = "tessera export"

    def __init__(self, run: Store, out: Store, cfg: ExportConfig):
        self.trained, self.folder, self.cfg = run, out, cfg

    def run(self, stage: StageRun) -> ExportSummary:
        return _export(self.trained, self.folder, self.cfg, stage.fence)


def export_run(run: Store, out: Store, cfg: ExportConfig, lease: LeaseConfig | Fence = DEFAULT_LEASE
               ) -> ExportSummary:
    """ExportStage through the engine, holding OUT's lease (or under LEASE, the fence of a caller
    that holds it)."""
    return execute(ExportStage(run, out, cfg), lease, progress=False)


def _export(run: Store, out: Store, cfg: ExportConfig, fence: Fence) -> ExportSummary:
    meta, state = read_saved(run)
    model = load_model(meta, state)
    shards, train_cfg = trained_on(run)
    info = data_for(meta, shards, train_cfg, run)
    newest = info.folders[-1]
    embed = newest.read_json(EmbedSummary.FILE)
    if "config" not in embed:
        raise ValueError(f"{newest.url} was embedded by an older tessera: run `tessera embed` on it again")
    preprocess = {"shard": newest.read_json(SHARD_CONFIG)["config"], "embed": embed["config"],
                  "encoders": {m: embed["encoders"][m] for m in meta.dims}}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        (folder / META).write_bytes(meta.to_bytes())
        (folder / PREPROCESS).write_text(json.dumps(preprocess, indent=1))
        files = _onnx_files(model, folder, cfg)
        scorers = {n: onnx_scorer(f) for n, f in files.items()}
        bundle = _bundle(meta, preprocess, info, train_cfg, cfg, folder / BUNDLE, scorers) if cfg.bundle else None
        teacher = None
        if train_cfg.distill_from:
            teacher_meta, teacher_state = read_saved(run.at(train_cfg.distill_from))
            teacher = load_model(teacher_meta, teacher_state)
            (Path(tmp) / "teacher").mkdir()
            teacher_files = _onnx_files(teacher, Path(tmp) / "teacher", cfg.model_copy(update={"prune_sparsity": None}))
            scorers["teacher"] = onnx_scorer(teacher_files["fp32"])
        batches = eval_batches(info, "val", train_cfg, cfg.batch_size)
        first = next(batches, None)  # also the batch the ONNX throughput is measured on
        scored, samples = compare_variants(itertools.chain([first] if first else [], batches),
                                           eager_scorer(model), scorers, info.tasks)
        speed = {n: samples_per_second(scorers[n], first) if first else None for n in ("fp32", "teacher")
                 if n in scorers}
        variants = {}
        for name, path in files.items():
            data = path.read_bytes()
            variants[name] = {"file": path.name, "bytes": len(data), "gzip_bytes": len(gzip.compress(data)),
                              **scored[name]}
        fp32 = variants["fp32"]
        fp32["onnx_samples_per_s"] = speed["fp32"]
        for name, variant in variants.items():
            variant["size_ratio_vs_fp32"] = round(fp32["bytes"] / variant["bytes"], 3)
            variant["within_tolerance"] = within_tolerance(info.tasks, variant, fp32, cfg.accuracy_tolerance)
            if name == "pruned":
                variant["sparsity"] = cfg.prune_sparsity
        distillation = None
        if teacher is not None:
            student, teacher_size = _size(model, files), _size(teacher, teacher_files)
            distillation = {
                "teacher": {"run": train_cfg.distill_from, **teacher_size, "onnx_samples_per_s": speed["teacher"],
                            "tasks": _metrics_only(scored["teacher"]["tasks"])},
                "student": {**student, "onnx_samples_per_s": speed["fp32"], "tasks": _metrics_only(fp32["tasks"]),
                            # the teacher scored as a variant: how often it predicts what the student does
                            "agreement_with_teacher": {t: m["same_prediction_as_eager"]
                                                       for t, m in scored["teacher"]["tasks"].items()}},
                "parameter_ratio": student["parameters"] / teacher_size["parameters"],
            }
        out.makedirs()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            fence.check(path.name)
            out.put_file(str(path), path.relative_to(folder).as_posix())
    for name, v in variants.items():  # pruning zeroes weights but keeps them: only its gzip size drops
        size = {"int8": f"x{v['size_ratio_vs_fp32']:.2f} smaller than fp32",
                "pruned": f"the same size as fp32, {v['gzip_bytes']} bytes gzipped"}.get(name, "")
        log.info("export %s: %s, %d bytes%s", name, v["file"], v["bytes"], f" ({size})" if size else "")
    return ExportSummary(run=run.url, model=meta.checkpoint, val_samples=samples,
                         accuracy_tolerance=cfg.accuracy_tolerance, tasks=[t.name for t in info.tasks],
                         variants=variants, bundle=bundle, distillation=distillation)
