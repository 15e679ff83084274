"""What a training run writes through its store (any fsspec URL), so that no node needs to see
another's disk: DeepSpeed checkpoints and rank 0's metrics.jsonl. Local disk is scratch only.

A store on the local filesystem is written in place (one machine, or a shared filesystem);
any other store gets copies of files made in a node-local scratch folder."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from tessera.core.storage import Store
from tessera.train.layout import LATEST, METRICS

log = logging.getLogger(__name__)

TAG = re.compile(r"step-\d{7,}")
ZERO_PARTS = "zero_pp_rank_*_mp_rank_*_optim_states.pt"  # a checkpoint's ZeRO state: one per data-parallel rank
UNIVERSAL = "-universal"  # a tag's universal form (on a disk only, never in the store)
UPLOAD_SECONDS = 10.0  # metrics.jsonl reaches a remote store at least this often while training


def tag_of(step: int) -> str:
    return f"step-{step:07d}"


def _scratch_root() -> Path:
    return Path(tempfile.gettempdir()) / "tessera-train"


def scratch_for(url: str) -> Path:
    """This node's scratch folder for the store at URL (the same on every call, so a worker
    restarted on the same node finds what it left)."""
    return _scratch_root() / hashlib.sha256(url.encode()).hexdigest()[:16]


def disk_id() -> str:
    """An id of the disk this process's scratch is on, the same for every process that sees it."""
    path = _scratch_root() / "disk-id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"disk-id.{uuid.uuid4().hex}")
        tmp.write_text(uuid.uuid4().hex)
        with contextlib.suppress(FileExistsError):  # another process made it first: its id holds
            os.link(tmp, path)
        tmp.unlink()
    return path.read_text()


class Checkpoints:
    """DeepSpeed checkpoints saved in `local` and kept in `store`, which is the truth: `latest`
    there is written last, once every rank's files are in, and a node that lacks that tag
    pulls it. DeepSpeed loads checkpoints with pickle: the store must be trusted like code."""

    def __init__(self, store: Store):
        self.store = store
        self.in_place = store.is_local
        self.local = Path(store.local_path()) if self.in_place else scratch_for(store.url)

    def latest(self) -> str | None:
        if not self.store.exists(LATEST):
            return None
        tag = self.store.read_bytes(LATEST).decode().strip()
        if not TAG.fullmatch(tag):  # it becomes a path: nothing but a tag name is accepted
            raise ValueError(f"{self.store.url_of(LATEST)} names {tag[:80]!r}, not a checkpoint tag (step-NNNNNNN)")
        return tag

    def prepare(self) -> str | None:
        """Make this disk's scratch hold the store's latest checkpoint (the first rank on each
        disk calls it); the latest tag, or None for a run with no checkpoint yet."""
        tag = self.latest()
        if self.in_place:
            return tag
        if tag is None:  # left by an earlier run at this URL that is gone from the store
            shutil.rmtree(self.local, ignore_errors=True)
            return None
        self.pull(tag)
        return tag

    def pull(self, tag: str) -> None:
        """Download the files of TAG that this node does not hold (other ranks' ZeRO parts)."""
        if self.in_place:
            return
        for name in self.store.child(tag).infos():
            target = self.local / tag / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".part")  # a killed download is never taken as whole
                self.store.get_file(f"{tag}/{name}", str(partial))
                partial.replace(target)

    def push(self, tag: str) -> None:
        """Upload the files of TAG written on this disk (its first rank, after every rank saved);
        older tags on this disk are dropped (the store holds them)."""
        if self.in_place:
            return
        for path in sorted(p for p in (self.local / tag).rglob("*") if p.is_file()):
            self.store.put_file(str(path), f"{tag}/{path.relative_to(self.local / tag)}")
        for old in self.local.glob("step-*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)

    def commit(self, tag: str, keep: int) -> None:
        """Point `latest` at TAG, then drop all but the newest KEEP tags (rank 0 only)."""
        self.store.write_bytes(LATEST, tag.encode())
        tags = sorted((name for name in self.store.names("step-*") if TAG.fullmatch(name)),
                      key=lambda name: int(name.removeprefix("step-")))  # by step: "step-10000000" is newest
        for old in tags[:-keep]:
            self.store.remove(old, recursive=True)

    def saved_world(self, tag: str) -> int | None:
        """How many data-parallel ranks saved TAG's ZeRO partitions (None: it has none, ZeRO
        stage 0, whose optimizer state is whole in the model file and loads on any number)."""
        return len(self.store.names(f"{tag}/{ZERO_PARTS}")) or None

    def universal(self, tag: str) -> str:
        """TAG converted on this disk to DeepSpeed's universal checkpoint (every rank's parts
        pulled first), which any number of ranks loads; the tag to load it by. Called by the
        first rank on each disk; drop_universal removes it once loaded."""
        from deepspeed.checkpoint import ds_to_universal

        self.pull(tag)
        out = self.local / f"{tag}{UNIVERSAL}"
        shutil.rmtree(out, ignore_errors=True)  # (a conversion a killed worker left half done)
        args = argparse.Namespace(input_folder=str(self.local / tag), output_folder=str(out),
                                  num_extract_workers=1, num_merge_workers=1,  # no subprocesses in a worker
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()) as said:  # its progress lines go to the log
            ds_to_universal.main(args)
        log.debug("universal checkpoint of %s: %s", tag, said.getvalue())
        return out.name

    def drop_universal(self, tag: str) -> None:
        shutil.rmtree(self.local / f"{tag}{UNIVERSAL}", ignore_errors=True)

    def clear_scratch(self) -> None:
        if not self.in_place:
            shutil.rmtree(self.local, ignore_errors=True)


class MetricsLog:
    """Rank 0's metrics.jsonl: appended on its own disk, copied to the run's store at
    checkpoints, epoch ends, the end, and at most UPLOAD_SECONDS apart in between. On resume
    the records after the checkpoint's step are dropped (those steps are trained again)."""

    def __init__(self, run: Store, resumed_step: int | None):
        self.run = run
        self.local = Path(run.local_path(METRICS)) if run.is_local else scratch_for(run.url) / METRICS
        lines = run.read_bytes(METRICS).decode().splitlines() if run.exists(METRICS) else []
        records = [json.loads(line) for line in lines]
        kept = [line for line, r in zip(lines, records, strict=True) if r.get("step", 0) <= (resumed_step or 0)]
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.local.write_text("".join(line + "\n" for line in kept))
        self.file = self.local.open("a")
        self.uploaded = time.monotonic()
        if resumed_step is not None:  # steps trained again: those after the checkpoint (as last uploaded)
            self.write({"resumed_at": resumed_step, "steps_redone": sum(
                1 for r in records if "loss" in r and r["step"] > resumed_step)})

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if time.monotonic() - self.uploaded > UPLOAD_SECONDS:
            self.upload()

    def upload(self) -> None:
        if not self.run.is_local:
            self.run.put_file(str(self.local), METRICS)
        self.uploaded = time.monotonic()

    def close(self) -> None:
        self.file.close()
        self.upload()
