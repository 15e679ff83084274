"""`tessera export --bundle`: the encoders the model was trained with, as ONNX graphs beside its
head (features/onnx_encoders.py runs them with onnxruntime alone), fp32 and dynamic int8, with
the text tokenizer; and how close the bundle comes to the torch path on validation samples
read from the shards: per encoder the largest cosine difference of its vectors from the torch
encoder's, end to end the share of predictions alike (the fp32 head on torch vectors is the
reference)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tessera.core.storage import Store
from tessera.features.onnx_encoders import load_bundle
from tessera.preprocess.config import MODALITIES
from tessera.preprocess.layout import committed_shards, iter_shard, member_payload
from tessera.train.data import DatasetInfo, ValSplit, split_of
from tessera.train.inputs import Scorer, model_batch, sample_vectors
from tessera.train.layout import BUNDLE_META, BUNDLE_VARIANTS, TOKENIZER, ModelMeta, encoder_onnx
from tessera.train.tasks import Task, agreement


def write_bundle(encoders: dict, folder: Path, int8: bool) -> dict:
    """Each encoder's graph into FOLDER (video's is image's), its int8 quantization when INT8,
    the tokenizer and bundle.json; returns bundle.json's content."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir(parents=True, exist_ok=True)
    specs, graphs = {}, {}
    for modality, encoder in encoders.items():
        model = encoder.image if modality == "video" else encoder
        graph = model.modality
        graphs.setdefault(graph, model)
        specs[modality] = {"identity": encoder.identity(), "dim": encoder.dim, "graph": graph,
                           "config": model.cfg.model_dump(mode="json")}
        if modality == "text":
            tokenizer = model.model.tokenizer
            specs[modality].update(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
            (folder / TOKENIZER).write_text(tokenizer.backend_tokenizer.to_str())
    files = {}
    for graph, model in graphs.items():
        fp32 = folder / encoder_onnx(graph, "fp32")
        model.export_onnx(fp32)
        files[graph] = {"fp32": fp32}
        if int8:
            files[graph]["int8"] = folder / encoder_onnx(graph, "int8")
            quantize_dynamic(str(fp32), str(files[graph]["int8"]), weight_type=QuantType.QInt8)
    meta = {"encoders": specs,
            "graphs": {g: {v: {"file": p.name, "bytes": p.stat().st_size} for v, p in per.items()}
                       for g, per in files.items()}}
    (folder / BUNDLE_META).write_text(json.dumps(meta, indent=1))
    return meta


def validation_payloads(info: DatasetInfo, val_split: ValSplit, limit: int) -> list[dict[str, bytes]]:
    """Up to LIMIT validation samples' members by modality, in shard order (the first shards
    that hold that many)."""
    out: list[dict[str, bytes]] = []
    for folder in info.folders:
        for shard in committed_shards(folder):
            for sample in iter_shard(folder, shard):
                if split_of(sample["__key__"], val_split, json.loads(sample["json"]).get("split_group")) != "val":
                    continue
                out.append({m: p for m in MODALITIES if (p := member_payload(sample, m)) is not None})
                if len(out) == limit:
                    return out
    return out


def _largest_cosine_difference(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float | None:
    """1 - cos of the two encoders' vectors, the largest over the samples both embedded."""
    both = a[0] & b[0]
    if not both.any():
        return None
    x, y = a[1][both[a[0]]], b[1][both[b[0]]]
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    return float((1 - cos).max())


def check_bundle(torch_encoders: dict, bundle: Store, meta: ModelMeta, heads: dict[str, Scorer], tasks: Sequence[Task],
                 payloads: list[dict[str, bytes]], dtype: str) -> dict:
    """export.json's `bundle` record: per encoder its graph's bytes and largest cosine difference
    from the torch encoder per variant; per variant the share of predictions (per task) that
    equal the torch path's. HEADS: the head's scorer per variant (int8 bundle + int8 head)."""
    spec = bundle.read_json(BUNDLE_META)
    reference, _ = sample_vectors(torch_encoders, payloads, dtype)
    expected = heads["fp32"](model_batch(meta, payloads, reference)) if payloads else {}
    encoders = {m: {"graph": s["graph"], "bytes": {v: f["bytes"] for v, f in spec["graphs"][s["graph"]].items()},
                    "max_cosine_diff": {}} for m, s in spec["encoders"].items()}
    agreement_with_torch = {}
    for variant in (v for v in BUNDLE_VARIANTS if v in heads):  # int8 graphs exactly when an int8 head
        present, _ = sample_vectors(load_bundle(bundle, variant, meta.dims), payloads, dtype)
        for modality in encoders:
            encoders[modality]["max_cosine_diff"][variant] = (
                _largest_cosine_difference(reference[modality], present[modality])
                if modality in reference and modality in present else None)
        if payloads:
            scores = heads[variant](model_batch(meta, payloads, present))
            agreement_with_torch[variant] = {t.name: agreement(t, scores[t.name], expected[t.name]) / len(payloads)
                                             for t in tasks}
    return {"samples": len(payloads), "encoders": encoders, "agreement_with_torch": agreement_with_torch}
