"""Scheduled incremental refresh: only new or changed manifest rows become a new dataset version.

OUT/versions/vNNNNNN/ holds a version's shards (with sidecars); OUT/embed-cache is shared,
so embeddings are computed for new content only. A row's identity is its JSON plus the
sha256 of every file it names: a row is new when no earlier version saw that identity, so
rejected rows are not retried until they change. OUT/refresh.lock keeps two refreshes from
overlapping; a lock left by a dead process (or older than the timeout) is taken over.
With job.refresh_train, the new version is then trained into vNNNNNN/train, starting from
the newest earlier version's model."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from features.stage import run_embed_stage
from preprocess.manifest import parse_row, read_records
from preprocess.reject import Reject
from preprocess.shard import InputDigest
from preprocess.stage import OutputConflict, digest_rows, run_shard_stage
from preprocess.storage import absolute, filesystem, join, parent, read_json, resolve, write_atomic
from train.saved import TRAIN_SUMMARY, WEIGHTS
from workflows.config import ConfigError, TesseraConfig
from workflows.jobs import train_into

log = logging.getLogger(__name__)

LOCK = "refresh.lock"
INPUTS = "inputs.parquet"  # identities of the rows a version took in
LOCK_TIMEOUT_S = 24 * 3600


class Locked(RuntimeError):
    """Another refresh holds OUT."""


@contextlib.contextmanager
def refresh_lock(fs, root: str):
    path = join(root, LOCK)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    if fs.exists(path):
        holder = json.loads(fs.cat_file(path))
        alive = holder["host"] == me["host"] and psutil.pid_exists(holder["pid"])
        if alive or (holder["host"] != me["host"] and time.time() - holder["started"] < LOCK_TIMEOUT_S):
            raise Locked(f"{path} is held by pid {holder['pid']} on {holder['host']} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}")
        log.warning("taking over a stale lock left by pid %d on %s", holder["pid"], holder["host"])
    fs.makedirs(root, exist_ok=True)
    write_atomic(fs, path, json.dumps(me).encode())
    try:
        yield
    finally:
        fs.rm(path)


def versions(out: str, storage_options: dict) -> list[dict]:
    """Every version under OUT with its counts, oldest first."""
    fs, root = filesystem(absolute(out), storage_options)
    found = []
    for path in sorted(fs.glob(join(root, "versions", "v*", INPUTS))):  # complete versions only
        folder = path.rsplit("/", 1)[0]
        summary = read_json(fs, join(folder, "summary.json"))
        trained = join(folder, "train", TRAIN_SUMMARY)
        found.append({"version": folder.rsplit("/", 1)[-1], "inputs": summary["inputs"],
                      "accepted": summary["accepted"], "rejected": summary["rejected"], "shards": summary["shards"],
                      "val_accuracy": read_json(fs, trained)["val_accuracy"] if fs.exists(trained) else None})
    return found


def _identities(cfg: TesseraConfig) -> list[tuple[str, dict]]:
    """(identity, manifest object with resolved paths) for every manifest row."""
    options = cfg.runtime.storage_options
    manifest = absolute(cfg.job.manifest)
    base = parent(manifest)
    rows, parsed = [], []
    for line, obj in read_records(manifest, options):
        text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
        rows.append([hashlib.sha256(text.encode()).hexdigest(), obj, line])
        if isinstance(obj, dict):
            with contextlib.suppress(Reject):
                parsed.append((len(rows) - 1, parse_row(obj, line, base, cfg.shard)))
    digests = digest_rows([row for _, row in parsed], options)
    for (i, _), digest in zip(parsed, digests, strict=True):
        content = digest.content_id if isinstance(digest, InputDigest) else digest.reason
        rows[i][0] = hashlib.sha256((rows[i][0] + content).encode()).hexdigest()
        obj = dict(rows[i][1])
        for name in ("image", "audio", "video", "text_file"):
            if isinstance(obj.get(name), str):
                obj[name] = resolve(base, obj[name])
        rows[i][1] = obj
    return [(identity, obj) for identity, obj, _ in rows]


def run_refresh(cfg: TesseraConfig) -> dict:
    """Shard and embed what is new since the last version; {'version': None} when nothing is."""
    if not cfg.job.manifest or not cfg.job.out:
        raise ConfigError("tessera refresh needs job.manifest and job.out in the config")
    options = cfg.runtime.storage_options
    out = absolute(cfg.job.out)
    fs, root = filesystem(out, options)
    with refresh_lock(fs, root):
        seen: set[str] = set()
        for path in fs.glob(join(root, "versions", "v*", INPUTS)):
            seen.update(pq.read_table(io.BytesIO(fs.cat_file(path))).column("identity").to_pylist())
        fresh = [(identity, obj) for identity, obj in _identities(cfg) if identity not in seen]
        if not fresh:
            log.info("refresh: nothing new in %s", cfg.job.manifest)
            return {"version": None, "new_rows": 0}
        number = len(fs.glob(join(root, "versions", "v*", INPUTS))) + 1
        version = join(out, "versions", f"v{number:06d}")
        vfs, vroot = filesystem(version, options)
        vfs.makedirs(vroot, exist_ok=True)
        lines = "".join((obj if isinstance(obj, str) else json.dumps(obj)) + "\n" for _, obj in fresh)
        write_atomic(vfs, join(vroot, "manifest.jsonl"), lines.encode())
        try:  # an interrupted refresh of the same rows resumes its version
            shard = run_shard_stage(join(version, "manifest.jsonl"), version, cfg.shard, options,
                                    cfg.runtime.progress)
        except OutputConflict:  # ... of other rows: that incomplete version is redone
            for path in vfs.ls(vroot):
                if not path.endswith("manifest.jsonl"):
                    vfs.rm(path, recursive=True)
            shard = run_shard_stage(join(version, "manifest.jsonl"), version, cfg.shard, options,
                                    cfg.runtime.progress)
        embed_cfg = cfg.embed if cfg.embed.cache else cfg.embed.model_copy(update={"cache": join(out, "embed-cache")})
        embed = run_embed_stage(version, embed_cfg, options, cfg.runtime.progress)
        result = {"version": f"v{number:06d}", "new_rows": len(fresh), "shard": shard, "embed": embed}
        if cfg.job.refresh_train != "none":
            result["train"] = _train_version(cfg, out, version)
        buf = io.BytesIO()
        pq.write_table(pa.table({"identity": [identity for identity, _ in fresh]}), buf)
        write_atomic(vfs, join(vroot, INPUTS), buf.getvalue())  # last: the version is complete
        log.info("refresh: version v%06d with %d new or changed rows", number, len(fresh))
        return result


def _train_version(cfg: TesseraConfig, out: str, version: str) -> dict:
    """Train on the new version (or on every version) into VERSION/train, starting from the
    newest earlier version's model (else train.init_from, else from scratch)."""
    options = cfg.runtime.storage_options
    fs = filesystem(out, options)[0]
    earlier = [join(out, "versions", v["version"]) for v in versions(out, options)]
    trained = [v for v in earlier if fs.exists(join(filesystem(v, options)[1], "train", WEIGHTS))]
    start = join(trained[-1], "train") if trained else cfg.train.init_from
    shards = [*earlier, version] if cfg.job.refresh_train == "all" else [version]
    run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": start})})
    name = version.rstrip("/").rsplit("/", 1)[-1]
    summary, _, _ = train_into(run_cfg, out, join("versions", name, "train"), shards)
    log.info("refresh: trained %s on %d version(s) from %s", name, len(shards), start or "scratch")
    return summary
