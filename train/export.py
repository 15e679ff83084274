"""A trained run as files to serve: the fp32 weights (safetensors) with model.json, the
settings that reproduce its inputs (preprocess.json), an ONNX graph of the model that
onnxruntime serves without tessera's training code, its dynamic int8 quantization and
optionally a magnitude-pruned variant. Each variant's size and validation metrics go to
export.json beside fp32's."""

from __future__ import annotations

import copy
import gzip
import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from features.stage import EMBED_SUMMARY
from preprocess.layout import SHARD_CONFIG
from preprocess.storage import filesystem, join, read_json, write_json
from train.config import ExportConfig
from train.evaluate import Metrics, Scorer, data_for, eager_scorer, eval_batches, run_record
from train.model import MultimodalModel
from train.saved import META, WEIGHTS, load_model, read_saved

log = logging.getLogger(__name__)

PREPROCESS, EXPORT = "preprocess.json", "export.json"
ONNX = {"fp32": "model.onnx", "int8": "model-int8.onnx", "pruned": "model-pruned.onnx"}


class Serving(nn.Module):
    """The exported graph: packed embeddings (+ pixels) -> class probabilities."""

    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor | None = None):
        inputs = (features, mask) if pixels is None else (features, mask, pixels)
        return torch.softmax(self.model(inputs), dim=-1)


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
                                dynamic_shapes={n: {0: batch} for n in names}, output_names=["probabilities"])
    program.save(str(path))


def onnx_scorer(model: Path | str | bytes) -> Scorer:
    """Class probabilities from an ONNX file (a path, or its bytes) with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def score(batch: dict) -> np.ndarray:
        return session.run(None, {n: np.asarray(batch[n], np.float32) for n in names})[0]

    return score


def pruned(model: MultimodalModel, sparsity: float) -> MultimodalModel:
    """A copy with the smallest-magnitude SPARSITY share of all linear weights set to zero."""
    from torch.nn.utils import prune

    copied = copy.deepcopy(model)
    linears = [(m, "weight") for m in copied.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in linears:
        prune.remove(module, name)
    return copied


def compare_variants(batches: Iterable[dict], eager: Scorer, variants: dict[str, Scorer], names: list[str]
                     ) -> tuple[dict[str, dict], int]:
    """Each variant's accuracy and macro-F1, its largest probability difference from the eager
    model and how often it predicts what eager predicts: one pass over the batches."""
    metrics = {n: Metrics(names) for n in variants}
    worst, same, samples = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0), 0
    for batch in batches:
        labels, reference = batch["labels"].numpy(), eager(batch)
        samples += len(labels)
        for name, score in variants.items():
            probs = score(batch)
            metrics[name].add(labels, probs)
            worst[name] = max(worst[name], float(np.abs(probs - reference).max()))
            same[name] += int((probs.argmax(1) == reference.argmax(1)).sum())
    result = {}
    for name, m in metrics.items():
        scores = m.result()
        result[name] = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                        "max_abs_diff_vs_eager": worst[name] if samples else None,
                        "same_prediction_as_eager": same[name] / samples if samples else None}
    return result, samples


def export_run(run: str, out: str, cfg: ExportConfig, storage_options: dict | None = None) -> dict:
    """Write RUN's model and its variants to OUT; returns export.json's content."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    storage_options = storage_options or {}
    meta, state = read_saved(run, storage_options)
    model = load_model(meta, state)
    shards, train_cfg = run_record(run, storage_options)
    info = data_for(meta, shards, train_cfg, storage_options)
    fs, newest = filesystem(info.roots[-1], storage_options)
    embed = read_json(fs, join(newest, EMBED_SUMMARY))
    if "config" not in embed:
        raise ValueError(f"{info.roots[-1]} was embedded by an older tessera: run `tessera embed` on it again")
    preprocess = {"shard": read_json(fs, join(newest, SHARD_CONFIG))["config"], "embed": embed["config"],
                  "encoders": {m: embed["encoders"][m] for m in meta["dims"]}}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        (folder / META).write_text(json.dumps(meta, indent=1))
        (folder / PREPROCESS).write_text(json.dumps(preprocess, indent=1))
        to_onnx(model, folder / ONNX["fp32"])
        if cfg.int8:
            quantize_dynamic(str(folder / ONNX["fp32"]), str(folder / ONNX["int8"]), weight_type=QuantType.QInt8)
        if cfg.prune_sparsity:
            to_onnx(pruned(model, cfg.prune_sparsity), folder / ONNX["pruned"])
        files = {name: file for name, file in ONNX.items() if (folder / file).exists()}
        scored, samples = compare_variants(eval_batches(info, "val", train_cfg, cfg.batch_size), eager_scorer(model),
                                           {n: onnx_scorer(folder / f) for n, f in files.items()}, meta["labels"])
        variants = {}
        for name, file in files.items():
            data = (folder / file).read_bytes()
            variants[name] = {"file": file, "bytes": len(data), "gzip_bytes": len(gzip.compress(data)),
                              **scored[name]}
        fp32 = variants["fp32"]
        for name, variant in variants.items():
            variant["size_ratio_vs_fp32"] = round(fp32["bytes"] / variant["bytes"], 3)
            if fp32["accuracy"] is not None:
                variant["within_tolerance"] = fp32["accuracy"] - variant["accuracy"] <= cfg.accuracy_tolerance
            if name == "pruned":
                variant["sparsity"] = cfg.prune_sparsity
        out_fs, out_root = filesystem(out, storage_options)
        out_fs.makedirs(out_root, exist_ok=True)
        for path in sorted(folder.iterdir()):
            out_fs.put_file(str(path), join(out_root, path.name))
    result = {"run": run, "model": meta["checkpoint"], "val_samples": samples,
              "accuracy_tolerance": cfg.accuracy_tolerance, "variants": variants}
    write_json(out_fs, join(out_root, EXPORT), result)
    for name, v in variants.items():
        log.info("export %s: %s, %d bytes (x%.2f smaller), val accuracy %s", name, v["file"], v["bytes"],
                 v["size_ratio_vs_fp32"], v["accuracy"])
    return result
