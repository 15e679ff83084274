"""`tessera status OUT`: what an output folder holds, read from its summaries and markers alone
(no Ray, no input opened): its kind (a job's OUT, a refresh OUT, a shard output, a training run,
an export), each stage's state (complete, and up to date with what it was made from), the
versions of a refresh output, who holds the lease now, the last run, and where the report and
the newest model are."""

from __future__ import annotations

import fnmatch
import time

from tessera.core.errors import NotAnInput
from tessera.core.lease import LEASE
from tessera.core.storage import Store
from tessera.core.versions import VERSION_DONE, VERSIONS, complete_versions, version_name
from tessera.features.layout import SIDECARS, CurateSummary, EmbedSummary
from tessera.preprocess.layout import SHARD_CONFIG, SHARD_FILES, Damage, ShardSummary, committed_shards, damaged
from tessera.preprocess.stats import medical_text
from tessera.train.layout import EXPORT, META, RUN_CONFIG, TRAIN_SUMMARY, WEIGHTS, TrainSummary
from tessera.workflows.layout import REPORT, RUN_SUMMARY, SHARDS, STATE, TRAIN


def _when(store: Store, name: str) -> str | None:
    """A file's modification time (UTC), as the store reports it."""
    info = store.info(name)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if stamp is None:
        return None
    if hasattr(stamp, "timestamp"):
        stamp = stamp.timestamp()
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(stamp)))


def version_records(out: Store) -> list[dict]:
    """Every complete version with its counts: what it changed and what its shards hold."""
    found = []
    for name in complete_versions(out):
        folder = out.child(name)
        counts, summary = folder.read_json(VERSION_DONE), ShardSummary.read(folder)
        found.append({"version": version_name(name),
                      **{c: counts[c] for c in ("added", "changed", "removed", "duplicate_key")},
                      "inputs": summary.inputs, "accepted": summary.accepted, "rejected": summary.rejected,
                      "shards": summary.shards})
    return found


def lease_state(folder: Store) -> dict | None:
    """The lease's holder when a live writer holds it (not released, renewed within its TTL)."""
    if not folder.exists(LEASE):
        return None
    record = folder.read_json(LEASE)
    if record.get("released") or time.time() - record["renewed"] > record["ttl_s"]:
        return None
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["acquired"]))
    return {"command": record["command"], "host": record["host"], "pid": record["pid"], "since": since}


def shard_folder_stages(shards: Store) -> dict[str, dict]:
    """The shard, embed and curate stages of a shard folder: complete / up to date, and counts."""
    stages: dict[str, dict] = {}
    if not ShardSummary.exists(shards):
        found = len(committed_shards(shards))
        stages["shard"] = {"complete": False, "detail": f"{found} shards committed, no summary yet"}
        return stages
    shard = ShardSummary.read(shards)
    written_with = shards.read_json(SHARD_CONFIG)["config_digest"] if shards.exists(SHARD_CONFIG) else None
    committed = len(committed_shards(shards))
    cut = damaged(shards)
    stages["shard"] = {"complete": True, "up_to_date": committed == shard.shards and
                       written_with in (None, shard.config_digest) and not _of(cut, SHARD_FILES),
                       "detail": f"{shard.inputs} inputs, {shard.accepted} accepted, {shard.rejected} rejected, "
                                 f"{shard.shards} shards{medical_text(shard.statistics)}",
                       "written": _when(shards, ShardSummary.FILE),
                       "damaged": _of(cut, SHARD_FILES)}
    if EmbedSummary.exists(shards):
        embed = EmbedSummary.read(shards)
        stages["embed"] = {"complete": True, "up_to_date": embed.shards == shard.shards and not embed.errors
                           and not _of(cut, (SIDECARS,)),
                           "detail": f"{embed.samples} samples, vectors of {', '.join(embed.dims)}",
                           "written": _when(shards, EmbedSummary.FILE), "damaged": _of(cut, (SIDECARS,))}
    else:
        stages["embed"] = {"complete": False, "detail": "not embedded"}
    if CurateSummary.exists(shards):
        curate = CurateSummary.read(shards)
        stages["curate"] = {"complete": True, "detail": f"semantic duplicates {curate.semantic_duplicates}, "
                                                        f"outliers {curate.outliers}",
                            "written": _when(shards, CurateSummary.FILE)}
    return stages


def _of(found: list[Damage], patterns: tuple[str, ...]) -> list[str]:
    """The damaged files of a stage (its files' PATTERNS), as `tessera status` lists them."""
    return [str(d) for d in found if any(fnmatch.fnmatchcase(d.name, p) for p in patterns)]


def run_stage(run: Store) -> dict:
    if not run.exists(TRAIN_SUMMARY):
        return {"complete": False, "detail": "training, or stopped before its summary (resumable)"}
    summary = TrainSummary.read(run)
    accuracy = "" if summary.val_accuracy is None else f", val accuracy {summary.val_accuracy:.3f}"
    return {"complete": True, "detail": f"{summary.steps} steps{accuracy}", "written": _when(run, TRAIN_SUMMARY)}


def _newest_model(runs: list[Store]) -> str | None:
    done = [(run.info(WEIGHTS).get("mtime") or 0, run.url_of(WEIGHTS)) for run in runs if run.exists(WEIGHTS)]
    return max(done)[1] if done else None


def folder_status(out: Store) -> dict:
    """OUT's status as a JSON-able record (see the module doc); FileNotFoundError when OUT is no
    folder tessera wrote."""
    status: dict = {"folder": out.url, "lease": lease_state(out)}
    if out.exists(EXPORT) or out.exists(META) and not out.exists(RUN_CONFIG):
        export = out.read_json(EXPORT) if out.exists(EXPORT) else {}
        status.update(kind="export", stages={"export": {
            "complete": bool(export), "detail": f"variants {sorted(export.get('variants', {}))}"
                                                f"{', with the encoder bundle' if export.get('bundle') else ''}"}},
            model=out.url)
    elif out.exists(RUN_CONFIG):
        status.update(kind="training run", stages={"train": run_stage(out)},
                      model=out.url_of(WEIGHTS) if out.exists(WEIGHTS) else None,
                      report=out.url_of(REPORT) if out.exists(REPORT) else None)
    elif out.exists(STATE) or out.names(f"{VERSIONS}/v*"):
        records = version_records(out)
        runs = [out.child(name, TRAIN) for name in complete_versions(out)]
        status.update(kind="refresh output", versions=records, newest=records[-1]["version"] if records else None,
                      stages=shard_folder_stages(out.child(complete_versions(out)[-1])) if records else {},
                      model=_newest_model(runs), last_run=_when(out, STATE) if out.exists(STATE) else None)
    elif out.exists(RUN_SUMMARY) or out.isdir(SHARDS):
        shards = out.child(SHARDS)
        stages = shard_folder_stages(shards)
        runs = [out.child(TRAIN, name.rsplit("/", 1)[-1]) for name in out.names(f"{TRAIN}/*")]
        for run in runs:
            stages[f"train {run.url.rsplit('/', 1)[-1]}"] = run_stage(run)
        last = out.read_json(RUN_SUMMARY) if out.exists(RUN_SUMMARY) else None
        status.update(kind="job output (tessera run)", stages=stages, model=_newest_model(runs),
                      report=out.url_of(REPORT) if out.exists(REPORT) else None,
                      last_run={"finished": _when(out, RUN_SUMMARY), "seconds": last["seconds"]} if last else None)
    elif ShardSummary.exists(out) or out.exists(SHARD_CONFIG):
        status.update(kind="shard output", stages=shard_folder_stages(out))
    else:
        raise NotAnInput(f"{out.url} holds nothing tessera wrote (no summary, run, version or export)")
    return status
