"""Scheduled incremental refresh: new or changed manifest rows become a new dataset version
(core/versions.py), rows gone from the manifest are recorded as removals. What it keeps in OUT
besides the versions (the shared embed-cache/, refresh/state.json, its identities) is named in
workflows/layout.py.

A row's identity is its JSON (paths resolved) plus cheap metadata of every file it names (size
and ETag / version id / mtime from `fs.info`), or with `job.refresh_identity: content` the
sha256 of each file. Ray tasks compute the identities chunk by chunk into Parquet; one DuckDB
query (in a Ray task, memory-limited, spilling) diffs them against every earlier version's
changes. Per key, the first manifest row counts (later rows of the same key are reported once
as duplicate keys):
  added    a key that is not in the dataset (never seen, or removed before),
  changed  a key whose row has another identity than the one the dataset holds,
  removed  a key of the dataset that is no longer in the manifest (takedowns, opt-outs);
           training over every version and evaluation leave its rows out.
A refresh whose manifest files have the sizes and tags the last one saw stats the files its
rows name (no file when rows are text) and opens no input: a no-op costs next to nothing.
A new version goes through the chain every job shares (workflows/jobs.py: run_chain)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from tessera.core.errors import ConfigError, OutputConflict
from tessera.core.lease import Fence, held
from tessera.core.runner import StageWork, in_flight_limit, task
from tessera.core.storage import Store, file_tag, is_local, parent, resolve
from tessera.core.versions import (
    ADDED,
    CHANGED,
    CHANGES,
    CHANGES_SCHEMA,
    REMOVED,
    VERSION_DONE,
    VERSION_MANIFEST,
    VERSIONS,
    complete_versions,
    version_folder,
    version_name,
)
from tessera.features.config import CurateConfig, EmbedConfig
from tessera.features.layout import CACHE, SIDECARS, CurateSummary, EmbedSummary
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.inputs import AllowedInputs
from tessera.preprocess.keys import safe_key
from tessera.preprocess.layout import (
    REJECT_SCHEMA,
    REJECTS,
    SHARD_CONFIG,
    SHARD_FILES,
    ShardSummary,
    check_output,
    damaged,
)
from tessera.preprocess.manifest import (
    Chunk,
    ManifestSource,
    chunks,
    parse_json_line,
    raw_records,
    source_key,
)
from tessera.preprocess.modality import file_fields
from tessera.train.layout import TRAIN_SUMMARY, WEIGHTS, TrainSummary
from tessera.workflows.config import TesseraConfig
from tessera.workflows.layout import IDENTITIES, STATE, TRAIN
from tessera.workflows.status import version_records

if TYPE_CHECKING:  # (the chain imports every stage: a refresh with nothing new loads none of them)
    from tessera.workflows.jobs import ChainResult

# The stages (and torch) are imported where a version is made: a no-op refresh, and the
# refreshes that find another one running, start in a fraction of a second.

log = logging.getLogger(__name__)

ROWS_PER_TASK = 16384  # manifest rows per identity task
REFUSED = "refused"  # the tag of an input outside the allowed roots (never stat'ed)
STAT_IN_PROCESS = 100_000  # up to this many file references, a no-op check stats them without Ray
IDENTITY_SCHEMA = pa.schema([("key", pa.string()), ("identity", pa.string()), ("file", pa.string()),
                             ("line", pa.int64()), ("row", pa.binary()), ("files", pa.list_(pa.string())),
                             ("tags", pa.list_(pa.string()))])


# ---------------------------------------------------------------------------------------------
# row identities (Ray tasks, one per chunk of the manifest)

def _file_tags(urls: list[str], mode: str, store: Store) -> dict[str, str]:
    """url -> what the identity holds of the file: its metadata tag, or its sha256 (content);
    the files read through STORE's options."""
    if mode == "content":
        got = store.read_many(urls)
        return {u: "missing" if isinstance(b, Exception) else hashlib.sha256(b).hexdigest() for u, b in got.items()}

    def tag(url: str) -> str:
        try:
            return file_tag(store.at(url).info())
        except FileNotFoundError:
            return "missing"

    if all(is_local(u) for u in urls):  # a stat is microseconds: threads would only add overhead
        return {u: tag(u) for u in urls}
    with ThreadPoolExecutor(16) as pool:  # HEAD requests on object stores
        return dict(zip(urls, pool.map(tag, urls), strict=True))


def row_identities(chunk: Chunk, mode: str, staging: Store, name: str, allow: tuple[str, ...]) -> int:
    """Write the chunk's rows with their identities to STAGING/NAME; returns the files they name."""
    base = parent(chunk.file.url)
    fields = file_fields()
    records = []
    for line, raw in raw_records(chunk):
        obj = raw if isinstance(raw, dict) else parse_json_line(raw)
        if not isinstance(obj, dict):  # not a JSON object: its bytes are its identity
            text = raw.strip()
            records.append((None, text, line, text, []))
            continue
        resolved = {k: resolve(base, v) if k in fields and isinstance(v, str) and v else v
                    for k, v in obj.items()}
        text = json.dumps(resolved, sort_keys=True, default=str).encode()
        files = [resolved[f] for f in fields if isinstance(resolved.get(f), str) and resolved[f]]
        key = source_key(obj)  # as the index holds it (what versions are matched by: core/versions.py)
        records.append((None if key is None else safe_key(key), text, line, text, files))
    # an input the shard stage will refuse is not even stat'ed (it may be a probe of another host)
    allowed = AllowedInputs.of(chunk.file.root, allow)
    named = {u for r in records for u in r[4]}
    refused = {u for u in named if allowed.refusal(u)}
    tags = {**_file_tags(sorted(named - refused), mode, chunk.file.store), **dict.fromkeys(refused, REFUSED)}
    table = pa.table({
        "key": [r[0] for r in records],
        "identity": [hashlib.sha256(r[1] + b"".join(f"\0{u}={tags[u]}".encode() for u in r[4])).hexdigest()
                     for r in records],
        "file": [chunk.file.name] * len(records),
        "line": [r[2] for r in records],
        "row": [r[3] for r in records],
        "files": [r[4] for r in records],
        "tags": [[tags[u] for u in r[4]] for r in records],
    }, schema=IDENTITY_SCHEMA)
    staging.write_parquet(name, table)
    return sum(len(r[4]) for r in records)


def files_unchanged(staging: Store, name: str) -> bool:
    """Whether every file the rows of a staged part name still has the tag it had."""
    table = pq.read_table(pa.BufferReader(staging.read_bytes(name)), columns=["files", "tags"])
    pairs = {(u, t) for us, ts in zip(*(table.column(c).to_pylist() for c in ("files", "tags")), strict=True)
             for u, t in zip(us, ts, strict=True) if t != REFUSED}
    tags = _file_tags(sorted({u for u, _ in pairs}), "metadata", staging)
    return all(tags[u] == t for u, t in pairs)


_identity_task = task(row_identities, num_cpus=1, scheduling_strategy="SPREAD")
_unchanged_task = task(files_unchanged, num_cpus=1, scheduling_strategy="SPREAD")


# ---------------------------------------------------------------------------------------------
# the diff (one DuckDB query in a Ray task)

# Aggregates and anti-joins, no window functions: DuckDB spills them, memory stays bounded.
# Besides the changes of preprocess/versions.py, the history records duplicate keys and rows
# without a key (so that a refresh reports each once).
DIFF = """
CREATE TEMP TABLE firsts AS  -- per key, its first row in the manifest
    SELECT key, min({'file': file, 'line': line}) AS first, count(*) AS n FROM ids
    WHERE key IS NOT NULL GROUP BY key;
CREATE TEMP TABLE state AS  -- per key: the identity the dataset holds, when the key is in it
    WITH last AS (
        SELECT key, max(version) FILTER (WHERE change IN ('$ADDED', '$CHANGED')) AS taken,
               coalesce(max(version) FILTER (WHERE change = '$REMOVED'), 0) AS removed
        FROM history WHERE key IS NOT NULL GROUP BY key)
    SELECT h.key, h.identity FROM history h JOIN last l ON h.key = l.key AND h.version = l.taken
    WHERE h.change IN ('$ADDED', '$CHANGED') AND l.taken > l.removed;
CREATE TEMP TABLE changes AS
    SELECT i.key, i.identity, i.file, i.line, CASE WHEN s.key IS NULL THEN '$ADDED' ELSE '$CHANGED' END AS change,
           NULL AS reason
    FROM ids i JOIN firsts f ON i.key = f.key AND i.file = f.first.file AND i.line = f.first.line
    LEFT JOIN state s ON i.key = s.key
    WHERE s.key IS NULL OR s.identity <> i.identity
    UNION ALL
    SELECT i.key, i.identity, i.file, i.line, 'duplicate_key', 'duplicate key (first on line ' || f.first.line ||
           CASE WHEN f.first.file <> i.file THEN ' of ' || f.first.file ELSE '' END || ')'
    FROM ids i JOIN firsts f ON i.key = f.key
    WHERE f.n > 1 AND (i.file <> f.first.file OR i.line <> f.first.line)
      AND NOT EXISTS (SELECT 1 FROM history h WHERE h.change = 'duplicate_key' AND h.identity = i.identity)
    UNION ALL
    SELECT key, identity, file, line, 'no_key', NULL FROM ids i
    WHERE key IS NULL AND NOT EXISTS (SELECT 1 FROM history h WHERE h.change = 'no_key' AND h.identity = i.identity)
    UNION ALL
    SELECT s.key, NULL, NULL, NULL, '$REMOVED', NULL FROM state s
    WHERE NOT EXISTS (SELECT 1 FROM firsts f WHERE f.key = s.key);
""".replace("$ADDED", ADDED).replace("$CHANGED", CHANGED).replace("$REMOVED", REMOVED)


def _view(con, name: str, urls: list[str], schema: pa.Schema) -> None:
    """NAME over these Parquet files (DuckDB's own reader), or empty with SCHEMA when there are none."""
    if urls:
        files = ", ".join("'" + url.replace("'", "''") + "'" for url in urls)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{files}])")
    else:
        con.register(name, schema.empty_table())


@dataclass(frozen=True)
class DiffCounts:
    """What the diff found in the manifest: rows per change (version.json holds them)."""

    added: int
    changed: int
    removed: int
    duplicate_key: int  # later rows of a key (reported once, never taken in)
    no_key: int  # rows without a usable key (taken in, to be rejected with their reason)

    @property
    def new_rows(self) -> int:
        """The rows the version takes in."""
        return self.added + self.changed + self.no_key

    def record(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def diff_manifest(out: Store, staging: Store, version: str, number: int, complete: list[str]) -> DiffCounts:
    """Compare the staged identities with the changes of every COMPLETE version; write the new
    version's manifest.jsonl, its duplicate-key rejects and changes.parquet."""
    target = out.child(version)
    with out.duckdb() as (con, scratch):
        _view(con, "ids", [staging.url_of(name) for name in staging.names("*.parquet")], IDENTITY_SCHEMA)
        _view(con, "history", [out.url_of(v, CHANGES) for v in complete], CHANGES_SCHEMA)
        con.execute(DIFF)
        counts = dict(con.execute("SELECT change, count(*) FROM changes GROUP BY change").fetchall())
        # the rows the version takes in, in manifest order, as JSONL: streamed, never whole
        rows = con.execute("SELECT i.row FROM changes c JOIN ids i ON c.file = i.file AND c.line = i.line "
                           f"WHERE c.change IN ('{ADDED}', '{CHANGED}', 'no_key') ORDER BY c.file, c.line"
                           ).to_arrow_reader(65536)
        local = f"{scratch}/{VERSION_MANIFEST}"
        with open(local, "wb") as f:
            for batch in rows:
                for row in batch.column(0).to_pylist():
                    f.write(row.rstrip(b"\r\n") + b"\n")
        _publish_unless_same(local, target, VERSION_MANIFEST)
        rejects = con.execute("SELECT key, key AS sample_key, file, line, NULL AS modality, "
                              "'refresh.duplicate_key' AS code, reason FROM changes "
                              "WHERE change = 'duplicate_key' ORDER BY file, line").to_arrow_table()
        target.write_parquet(f"{REJECTS}/refresh.parquet", rejects.cast(REJECT_SCHEMA))
        changes = con.execute(f"SELECT {number}::INTEGER AS version, key, identity, change FROM changes "
                              "ORDER BY change, key").to_arrow_table()
        target.write_parquet(CHANGES, changes.cast(CHANGES_SCHEMA))
    return DiffCounts(*(counts.get(c, 0) for c in (ADDED, CHANGED, REMOVED, "duplicate_key", "no_key")))


def _publish_unless_same(local: str, target: Store, name: str) -> None:
    """Copy a local file to TARGET/NAME unless that holds the same bytes already: an
    interrupted refresh that takes in the same rows then resumes its version's shards (a
    rewritten manifest would look like another one)."""
    def sha256(f) -> str:
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        return digest.hexdigest()

    if target.exists(name) and target.size(name) == os.path.getsize(local):
        with open(local, "rb") as mine, target.open(name) as theirs:
            if sha256(mine) == sha256(theirs):
                return
    target.put_file(local, name)


_diff_task = task(diff_manifest, num_cpus=1, max_retries=2)


# ---------------------------------------------------------------------------------------------
# versions and the job

def versions(out: Store) -> list[dict]:
    """Every complete version under OUT with its counts, oldest first, and the validation
    accuracy of its training run (None when it has none)."""
    found = []
    for record in version_records(out):
        run = out.child(VERSIONS, record["version"], TRAIN)
        found.append({**record, "val_accuracy": TrainSummary.read(run).val_accuracy
                      if run.exists(TRAIN_SUMMARY) else None})
    return found


def _unchanged_since_last(out: Store, source: ManifestSource, mode: str, allow: tuple[str, ...],
                          start: Callable[[], None], work: StageWork) -> bool:
    """Whether the last refresh saw this very manifest and every file its rows name is as it was."""
    if not out.exists(STATE):
        return False
    state = out.read_json(STATE)
    if (state["manifest"], state["identity"], state.get("allow")) != (source.fingerprint, mode, list(allow)):
        return False
    if not state["file_refs"]:
        return True
    if mode == "content":  # no cheap way to know the files' content is the same
        return False
    staging = out.child(state["identities"])
    parts = staging.names("*.parquet")
    if state["file_refs"] <= STAT_IN_PROCESS:
        return all(files_unchanged(staging, name) for name in parts)
    start()
    unchanged: list[bool] = []
    work.run(parts, lambda name, _: _unchanged_task.remote(staging, name), in_flight_limit(),
             lambda name, same: unchanged.append(same))
    return all(unchanged)


@dataclass(frozen=True)
class RefreshResult:
    """What a refresh did: the version it made (None: nothing new), the rows it took in, the
    changes the diff found, and the chain's summaries over the new version."""

    version: str | None = None
    new_rows: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    duplicate_key: int = 0
    no_key: int = 0
    chain: ChainResult | None = None

    def record(self) -> dict:
        """What `tessera refresh --json` prints."""
        trained = {"val_accuracy": self.chain.train.val_accuracy} if self.chain and self.chain.train else {}
        counts = {"added": self.added, "changed": self.changed, "removed": self.removed} if self.version else {}
        return {"version": self.version, "new_rows": self.new_rows, **counts, **trained}


def run_refresh(cfg: TesseraConfig, out: Store, start: Callable[[], None] = lambda: None,
                lease: Fence | None = None) -> RefreshResult:
    """Shard, embed (curate, and train: job.refresh_train) what is new since the last version
    into OUT (the store of job.out); record what was removed. START brings Ray up, once the
    lease is held and there is work (a no-op refresh runs without it). LEASE: OUT's fence when
    the caller holds it already."""
    if not cfg.job.manifest:
        raise ConfigError("tessera refresh needs job.manifest and job.out in the config")
    mode, work = cfg.job.refresh_identity, StageWork()
    with held(out, lease or cfg.runtime.lease, "tessera refresh") as fence:
        source = ManifestSource.open(cfg.job.manifest, out)
        allow = cfg.shard.inputs.allow
        if _unchanged_since_last(out, source, mode, allow, start, work):
            log.info("refresh: nothing new in %s", cfg.job.manifest)
            return RefreshResult()
        start()
        if out.names(f"{VERSIONS}/v*/inputs.parquet"):
            raise OutputConflict(f"{out.url} was made by an older tessera refresh (versions/*/inputs.parquet): "
                                 "refresh into a new output")
        for stale in out.names(f"{IDENTITIES}*"):  # left by an interrupted refresh
            if not out.exists(STATE) or stale != out.read_json(STATE)["identities"]:
                out.remove(stale, recursive=True)
        staging_name = f"{IDENTITIES}{uuid.uuid4().hex[:12]}"
        staging = out.child(staging_name)
        named: list[int] = []
        work.run(enumerate(chunks(source, ROWS_PER_TASK)),
                 lambda item, _: _identity_task.remote(item[1], mode, staging, f"chunk-{item[0]:06d}.parquet", allow),
                 in_flight_limit(), lambda item, files: named.append(files))
        complete = complete_versions(out)
        number = len(complete) + 1
        version = version_folder(number)
        counts: DiffCounts = work.get(_diff_task.remote(out, staging, version, number, complete))
        result = RefreshResult()
        if counts.new_rows or counts.removed or counts.duplicate_key:
            chain = _make_version(cfg, out, version, counts, source, fence)
            result = RefreshResult(version_name(version), counts.new_rows, counts.added, counts.changed,
                                   counts.removed, counts.duplicate_key, counts.no_key, chain)
        else:
            out.remove(version, recursive=True)
        previous = out.read_json(STATE)["identities"] if out.exists(STATE) else None
        fence.check(STATE)
        out.write_json(STATE, {"manifest": source.fingerprint, "identity": mode, "allow": list(allow),
                               "file_refs": sum(named), "identities": staging_name})
        if previous:
            with contextlib.suppress(FileNotFoundError):
                out.remove(previous, recursive=True)
        log.info("refresh: %s", "nothing new" if result.version is None else
                 f"{result.version}: {counts.added} added, {counts.changed} changed, {counts.removed} removed")
        return result


def _make_version(cfg: TesseraConfig, out: Store, version: str, counts: DiffCounts, source: ManifestSource,
                  fence: Fence) -> ChainResult:
    """The chain over the version's rows (shard, embed, curate and train as the job says), then
    the version committed: version.json last. Its manifest lives in OUT and names the inputs by
    their full URLs: they stay confined to the user's manifest root (and shard.inputs.allow)."""
    target = out.child(version)
    roots = tuple(dict.fromkeys((*cfg.shard.inputs.allow, *(f.root for f in source.files))))
    shard_cfg = cfg.shard.model_copy(update={"inputs": cfg.shard.inputs.model_copy(update={"allow": roots})})
    manifest = target.url_of(VERSION_MANIFEST)
    earlier = [out.child(name) for name in complete_versions(out)]  # what the new rows are deduped against
    cache = out.at(cfg.embed.cache) if cfg.embed.cache else out.child(CACHE)
    for position, folder in enumerate(earlier):
        _repair_version(cfg, folder, earlier[:position], cache)
    try:  # an interrupted refresh of the same rows resumes its version ...
        check_output(target, shard_cfg, ManifestSource.open(manifest, target))
    except OutputConflict:  # ... of other rows: that incomplete version's shards are written again
        keep = {VERSION_MANIFEST, CHANGES, REJECTS, f"{REJECTS}/refresh.parquet"}
        for name in [*target.names("*"), *target.names(f"{REJECTS}/*")]:
            if name not in keep:
                target.remove(name, recursive=True)
    from tessera.workflows.jobs import run_chain

    chain = run_chain(cfg, manifest, target, lambda folder, shard: _training(cfg, out, folder, shard, earlier),
                      shard_cfg=shard_cfg, cache=cache, earlier=earlier)
    fence.check(f"{version}/{VERSION_DONE}")
    target.write_json(VERSION_DONE, counts.record())  # the version is complete
    return chain


def _training(cfg: TesseraConfig, out: Store, version: Store, shard: ShardSummary, earlier: list[Store]
              ) -> tuple[Store, list[Store], TesseraConfig] | None:
    """Where the new version trains (job.refresh_train): on every version or on its own, into
    VERSION/train, starting from the newest earlier version's model (else train.init_from, else
    from scratch); None when it does not."""
    if not (cfg.job.refresh_train == "all" or (cfg.job.refresh_train == "new" and shard.accepted)):
        return None
    trained = [v for v in earlier if v.exists(f"{TRAIN}/{WEIGHTS}")]
    start = trained[-1].url_of(TRAIN) if trained else cfg.train.init_from
    shards = [*earlier, version] if cfg.job.refresh_train == "all" else [version]
    log.info("refresh: training %s on %d version(s) from %s", version_name(version), len(shards),
             start or "scratch")
    return version.child(TRAIN), shards, cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"init_from": start})})


def _repair_version(cfg: TesseraConfig, version: Store, earlier: list[Store], cache: Store) -> None:
    """Write an earlier version's damaged files again (its shards from its own manifest, with the
    config it was made with; its sidecars from the cache), and curate it again when it was: what
    the new version is deduped against and trained with must be whole."""
    found = damaged(version, (*SHARD_FILES, SIDECARS))
    if not found:
        return
    log.warning("refresh: %s has %d damaged files (%s): writing them again", version.url, len(found),
                ", ".join(map(str, found[:3])))
    made_with = cfg.model_copy(update={
        "shard": ShardConfig.model_validate(version.read_json(SHARD_CONFIG)["config"]),
        "embed": EmbedConfig.model_validate(EmbedSummary.read(version).config),
        "curate": cfg.curate if CurateSummary.exists(version) else CurateConfig()})
    from tessera.workflows.jobs import run_chain

    run_chain(made_with, version.url_of(VERSION_MANIFEST), version, lambda folder, shard: None, cache=cache,
              earlier=earlier)
