"""Dataset versions, as `tessera refresh` makes them and training, evaluation and readers take
them: each name said once, the `changes` schema, the listing, and which keys of an earlier
version a later one replaced or removed.

    OUT/versions/vNNNNNN/            a version: a shard folder (see preprocess/layout.py) plus
        manifest.jsonl               the rows it took in (what its shards are made from)
        changes.parquet              per key: added, changed, removed (CHANGES_SCHEMA)
        version.json                 its counts, written last: the version is complete

A key's newest copy wins; a key a later version removed is left out of every earlier one.
Light imports only (the CLI lists versions without starting Ray)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import pyarrow as pa

from preprocess.layout import INDEX, ShardSummary
from preprocess.storage import Store

VERSIONS = "versions"
VERSION_MANIFEST = "manifest.jsonl"
CHANGES = "changes.parquet"
VERSION_DONE = "version.json"
ADDED, CHANGED, REMOVED = "added", "changed", "removed"  # the changes a version records
CHANGES_SCHEMA = pa.schema([("version", pa.int32()), ("key", pa.string()), ("identity", pa.string()),
                            ("change", pa.string())])
COUNTS = (ADDED, CHANGED, REMOVED, "duplicate_key")  # what version.json holds, besides rows without a key
MEMORY_LIMIT = "256MB"  # of the query that finds superseded keys


def version_folder(number: int) -> str:
    """The name of version NUMBER's folder under OUT."""
    return f"{VERSIONS}/v{number:06d}"


def complete_versions(out: Store) -> list[str]:
    """The folders (names under OUT) of every complete version, oldest first."""
    return [name.rsplit("/", 1)[0] for name in out.names(f"{VERSIONS}/v*/{VERSION_DONE}")]


def version_records(out: Store) -> list[dict]:
    """Every complete version with its counts: what it changed and what its shards hold."""
    found = []
    for name in complete_versions(out):
        folder = out.child(name)
        counts, summary = folder.read_json(VERSION_DONE), ShardSummary.read(folder)
        found.append({"version": name.rsplit("/", 1)[-1], **{c: counts[c] for c in COUNTS},
                      "inputs": summary.inputs, "accepted": summary.accepted, "rejected": summary.rejected,
                      "shards": summary.shards})
    return found


def superseded(folders: Sequence[Store]) -> tuple[frozenset[str], ...]:
    """Per shard folder (dataset versions, oldest first), the keys of its samples that a later
    folder holds again (the newest copy wins) or removed. One DuckDB query over the index parts
    and changes; what it returns grows with the changes, not with the corpus."""
    if len(folders) == 1:
        return (frozenset(),)
    events = []
    for position, folder in enumerate(folders):
        if folder.names(f"{INDEX}/shard-*.parquet"):
            parts = folder.url_of(INDEX, "shard-*.parquet")
            events.append(f"SELECT key, {position} AS root FROM read_parquet('{parts}') WHERE duplicate_of IS NULL")
        if folder.exists(CHANGES):
            events.append(f"SELECT key, {position} AS root FROM read_parquet('{folder.url_of(CHANGES)}') "
                          f"WHERE change = '{REMOVED}'")
    newest = folders[-1]
    with tempfile.TemporaryDirectory(prefix="tessera-keys-") as scratch, newest.duckdb(scratch, MEMORY_LIMIT) as con:
        found = con.execute(f"WITH events AS ({' UNION ALL '.join(events)}), last AS "
                            "(SELECT key, max(root) AS last FROM events GROUP BY key) "
                            "SELECT e.root, list(e.key) FROM events e JOIN last l USING (key) WHERE e.root < l.last "
                            "GROUP BY e.root").fetchall()
    keys = dict(found)
    return tuple(frozenset(keys.get(i, ())) for i in range(len(folders)))
