"""Driver of the shard stage: plan on the driver, hash and write shards in Ray tasks,
resume from committed shards, then write index.parquet, rejects.jsonl and summary.json."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from preprocess.config import MODALITIES, ShardConfig
from preprocess.manifest import LineReject, ManifestRow, read_manifest
from preprocess.shard import InputDigest, ShardPlan, digest_inputs, write_shard
from preprocess.stats import DatasetStats
from preprocess.storage import absolute, filesystem, join, read_json, write_atomic, write_json

log = logging.getLogger(__name__)

DIGEST_CHUNK = 256  # rows hashed per Ray task
SHARD_CONFIG = "shard-config.json"
INDEX = "index.parquet"
SHARD_MARKER = re.compile(r"shard-\d{6,}\.json")
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_key", pa.string()), ("shard", pa.string()), ("line", pa.int64()),
    ("label", pa.string()), ("modalities", pa.list_(pa.string())),
    *[(f"{m}_sha256", pa.string()) for m in MODALITIES],
    *[(f"{m}_payload_sha256", pa.string()) for m in MODALITIES],
    ("raw_bytes", pa.int64()), ("stored_bytes", pa.int64()),
])


class OutputConflict(RuntimeError):
    """OUT already holds shards written from another config or other inputs."""


# Tasks are idempotent (temporary name + rename), so Ray may retry them on node loss
# and on I/O errors of the store.
_digest_task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError], scheduling_strategy="SPREAD")(
    digest_inputs)


def _write_shard_reporting_node(plan: ShardPlan, cfg: ShardConfig, out: str, storage_options: dict):
    return write_shard(plan, cfg, out, storage_options), ray.get_runtime_context().get_node_id()


_shard_task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError], scheduling_strategy="SPREAD")(
    _write_shard_reporting_node)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def claim_output(fs, root: str, cfg: ShardConfig) -> None:
    """Record the config in OUT, or refuse when OUT was written with another one."""
    path = join(root, SHARD_CONFIG)
    current = cfg.model_dump(mode="json")
    if fs.exists(path):
        previous = read_json(fs, path)
        if previous["config_digest"] != cfg.digest():
            old, new = _flatten(previous["config"]), _flatten(current)
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise OutputConflict(
                f"{root} was written with another shard config (fields changed: {', '.join(changed)}); "
                "write to a new output, or delete it first"
            )
        return
    fs.makedirs(root, exist_ok=True)
    write_json(fs, path, {"config_digest": cfg.digest(), "config": current})


def digest_rows(rows: list[ManifestRow], storage_options: dict) -> list[InputDigest | LineReject]:
    """Raw-input digests of every row (or its read reject), hashed by Ray tasks in chunks."""
    refs = [_digest_task.remote(rows[i : i + DIGEST_CHUNK], storage_options)
            for i in range(0, len(rows), DIGEST_CHUNK)]
    return [d for chunk in ray.get(refs) for d in chunk]


def dedup_and_digest(
    rows: list[ManifestRow], storage_options: dict, dedup: bool
) -> tuple[list[tuple[ManifestRow, InputDigest]], list[LineReject]]:
    digests = digest_rows(rows, storage_options)
    kept, rejects, first_by_content = [], [], {}
    for row, digest in zip(rows, digests, strict=True):
        if isinstance(digest, LineReject):
            rejects.append(digest)
            continue
        first = first_by_content.setdefault(digest.content_id, row) if dedup else row
        if first is not row:
            rejects.append(LineReject(row.line, row.source_key, None,
                                      f"duplicate content of {first.source_key!r} (line {first.line})"))
            continue
        kept.append((row, digest))
    return kept, rejects


def plan_shards(samples: list[tuple[ManifestRow, InputDigest]], cfg: ShardConfig) -> list[ShardPlan]:
    """Consecutive runs of samples, bounded by count and raw input bytes: fixed before any decoding."""
    plans, current, current_bytes = [], [], 0
    digest = cfg.digest()

    def close():
        rows, digests = zip(*current, strict=True)
        plans.append(ShardPlan(len(plans), tuple(rows), tuple(digests), digest))

    for row, d in samples:
        size = sum(d.sizes.values())
        over_bytes = cfg.max_input_bytes_per_shard and current_bytes + size > cfg.max_input_bytes_per_shard
        if current and (len(current) >= cfg.samples_per_shard or over_bytes):
            close()
            current, current_bytes = [], 0
        current.append((row, d))
        current_bytes += size
    if current:
        close()
    return plans


def _marker_names(fs, root: str) -> list[str]:
    names = (path.rsplit("/", 1)[-1] for path in fs.glob(join(root, "shard-*.json")))
    return sorted(name for name in names if SHARD_MARKER.fullmatch(name))


def committed_shards(out: str, storage_options: dict | None = None) -> list[str]:
    """Names of the tars in OUT whose commit marker is written: the only ones readers may use."""
    fs, root = filesystem(out, storage_options or {})
    tars = [name.removesuffix(".json") + ".tar" for name in _marker_names(fs, root)]
    return [tar for tar in tars if fs.exists(join(root, tar))]


def committed_markers(fs, root: str, plans: list[ShardPlan]) -> dict[int, dict]:
    """Markers of shards already committed for exactly this plan; any other shard is a conflict."""
    found = {}
    by_name = {p.name + ".json": p for p in plans}
    for name in _marker_names(fs, root):
        marker = read_json(fs, join(root, name))
        plan = by_name.get(name)
        if plan is None or marker.get("plan_digest") != plan.plan_digest:
            raise OutputConflict(
                f"{join(root, name)} was committed for other inputs than this manifest plans; "
                "write to a new output, or delete it first"
            )
        found[plan.index] = marker
    return found


def _reason_class(reject: dict) -> str:
    reason = reject["reason"].split(":")[0].split(" (")[0]
    return f"{reject['modality']}: {reason}" if reject["modality"] else reason


def run_shard_stage(
    manifest: str, out: str, cfg: ShardConfig, storage_options: dict | None = None, progress: bool = True
) -> dict:
    """Shard a manifest into OUT and return the summary. Ray must be initialized."""
    storage_options = storage_options or {}
    started = time.perf_counter()
    manifest, out = absolute(manifest), absolute(out)
    fs, root = filesystem(out, storage_options)
    claim_output(fs, root, cfg)
    for stale in fs.glob(join(root, "*.tmp-*")):  # left by a killed run; rewritten below
        fs.rm(stale)
    rows, rejects = read_manifest(manifest, cfg, storage_options)
    inputs = len(rows) + len(rejects)
    log.info("manifest %s: %d rows, %d rejected before reading files", manifest, len(rows), len(rejects))
    samples, input_rejects = dedup_and_digest(rows, storage_options, cfg.dedup)
    rejects += input_rejects
    plans = plan_shards(samples, cfg)
    markers = committed_markers(fs, root, plans)
    resumed = len(markers)
    if resumed:
        log.info("resuming: %d of %d shards already committed", resumed, len(plans))
    if resumed == len(plans) and fs.exists(join(root, "summary.json")):
        log.info("shard: up to date (%d shards)", resumed)  # nothing to write, the summary stands
        return {**read_json(fs, join(root, "summary.json")), "resumed_shards": resumed, "shards_by_node": {}}
    pending = {_shard_task.remote(p, cfg, out, storage_options): p for p in plans if p.index not in markers}
    bar = tqdm(total=len(plans), initial=resumed, unit="shard", disable=not progress, desc="shard")
    written = 0
    nodes: Counter = Counter()  # shards written per Ray node
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        plan = pending.pop(done[0])
        markers[plan.index], node = ray.get(done[0])
        nodes[node] += 1
        written += markers[plan.index]["samples"]
        bar.update()
        bar.set_postfix(samples_per_s=f"{written / (time.perf_counter() - started):.1f}")
    bar.close()
    summary = _merge_outputs(fs, root, [markers[p.index] for p in plans], [r.as_record() for r in rejects])
    seconds = time.perf_counter() - started
    summary.update(
        inputs=inputs,
        resumed_shards=resumed,
        shards_by_node=dict(nodes),
        seconds=round(seconds, 3),
        samples_per_s=round(written / seconds, 2),
        config_digest=cfg.digest(),
    )
    write_json(fs, join(root, "summary.json"), summary)
    log.info("%d accepted, %d rejected, %d shards in %.1f s", summary["accepted"], summary["rejected"],
             summary["shards"], seconds)
    return summary


def _merge_outputs(fs, root: str, markers: list[dict], rejects: list[dict]) -> dict:
    """index.parquet and rejects.jsonl from the shard markers; the summary's counts."""
    index = [row for m in markers for row in m["index"]]
    rejects = sorted(rejects + [r for m in markers for r in m["rejects"]], key=lambda r: r["line"])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), buf)
    write_atomic(fs, join(root, INDEX), buf.getvalue())
    write_atomic(fs, join(root, "rejects.jsonl"),
                 "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects).encode())
    stats = DatasetStats()
    for m in markers:
        stats = stats.merge(DatasetStats.from_dict(m["stats"]))
    return {
        "accepted": len(index),
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(_reason_class(r) for r in rejects).items())),
        "shards": len(markers),
        "bytes": sum(m["bytes"] for m in markers),
        "statistics": stats.summary(),
    }
