"""Dataset versions, as `tessera refresh` makes them and training, evaluation and readers take
them: each name said once, the `changes` schema, the listing, and which keys of an earlier
version a later one replaced or removed.

    OUT/versions/vNNNNNN/            a version: a shard folder (see preprocess/layout.py) plus
        manifest.jsonl               the rows it took in (what its shards are made from)
        changes.parquet              per key: added, changed, removed (CHANGES_SCHEMA)
        version.json                 its counts, written last: the version is complete

A key's newest copy decides (`live_query`): a later version's copy replaces an earlier one,
and a key a later version changed into a dropped copy, or removed, is left out of every
earlier one.
Light imports only (the CLI lists versions without starting Ray)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tessera.core.keys import row_key_sql
from tessera.core.storage import Store

# Which rows of one folder are live, the rule every reader shares: a folder's rows are its
# index parts (INDEX/shard-NNNNNN.parquet); the shard stage's dedup pass marks `duplicate_of`,
# curation marks `curated_out`. Embedding and curation read the rows the shard stage kept;
# everyone else the rows both kept. Across folders, live_query below.
INDEX = "index"
SHARD_KEPT = ds.field("duplicate_of").is_null()
KEPT = SHARD_KEPT & ds.field("curated_out").is_null()
KEPT_SQL = "duplicate_of IS NULL AND curated_out IS NULL"

VERSIONS = "versions"
VERSION_MANIFEST = "manifest.jsonl"
CHANGES = "changes.parquet"
VERSION_DONE = "version.json"
ADDED, CHANGED, REMOVED = "added", "changed", "removed"  # the changes a version records
CHANGES_SCHEMA = pa.schema([("version", pa.int32()), ("key", pa.string()), ("identity", pa.string()),
                            ("change", pa.string())])


def version_folder(number: int) -> str:
    """The name of version NUMBER's folder under OUT."""
    return f"{VERSIONS}/v{number:06d}"


def version_name(folder: Store | str) -> str:
    """A version's name (vNNNNNN) from its folder (a store, or its name under OUT)."""
    return (folder.url if isinstance(folder, Store) else folder).rstrip("/").rsplit("/", 1)[-1]


def complete_versions(out: Store) -> list[str]:
    """The folders (names under OUT) of every complete version, oldest first."""
    return [name.rsplit("/", 1)[0] for name in out.names(f"{VERSIONS}/v*/{VERSION_DONE}")]


def _newest_query(folders: Sequence[Store]) -> str:
    """(key, last): per row key, the newest of FOLDERS (positions, oldest first) that holds a copy of
    it in its index — kept or dropped — or whose changes say it was added, changed or removed.

    The rule every reader follows: a key's newest copy decides. When that copy was dropped (a
    duplicate, curated out, or rejected) or the key was removed, no earlier copy stands in for
    it: the manifest no longer says what the earlier copy says."""
    events = []
    for position, folder in enumerate(folders):
        if folder.names(f"{INDEX}/shard-*.parquet"):
            parts = folder.sql_url(INDEX, "shard-*.parquet")
            events.append(f"SELECT {row_key_sql()} AS key, {position} AS root FROM read_parquet({parts})")
        if folder.exists(CHANGES):
            events.append(f"SELECT key, {position} AS root FROM read_parquet({folder.sql_url(CHANGES)}) "
                          f"WHERE change IN ('{ADDED}', '{CHANGED}', '{REMOVED}')")
    return f"SELECT key, max(root) AS last FROM ({' UNION ALL '.join(events)}) GROUP BY key"


def _index_query(folders: Sequence[Store], columns: str) -> str:
    """COLUMNS and `root` of the index parts of FOLDERS, by column name: parts written before a
    column was added to the index lack it (null in their rows where another part has it)."""
    return " UNION ALL BY NAME ".join(f"SELECT {columns}, {position} AS root FROM read_parquet("
                                      f"{folder.sql_url(INDEX, 'shard-*.parquet')}, union_by_name = true)"
                                      for position, folder in enumerate(folders)
                                      if folder.names(f"{INDEX}/shard-*.parquet"))


def superseded_query(folders: Sequence[Store]) -> str:
    """(root, shard, key) of every index row of FOLDERS (positions, oldest first) whose key a
    later folder holds again, or changed or removed (_newest_query)."""
    return (f"SELECT i.root::INTEGER AS root, i.shard, i.key FROM ({_index_query(folders, 'shard, key')}) i "
            f"JOIN ({_newest_query(folders)}) n ON {row_key_sql('i.key')} = n.key WHERE i.root < n.last")


def live_query(folders: Sequence[Store]) -> str:
    """The live rows of FOLDERS (positions, oldest first; at least one holds an index part):
    every index column and `root` (the folder's position) of each row its own folder kept
    (`KEPT_SQL`) whose folder is its key's newest (_newest_query). What training counts and
    dedup across versions compares with; the loaders, curation and readers read the same rows
    per shard (the kept rows less `superseded_query`'s)."""
    rows = f"SELECT * FROM ({_index_query(folders, '*')}) WHERE {KEPT_SQL}"
    if len(folders) == 1:
        return rows
    return (f"SELECT i.* FROM ({rows}) i JOIN ({_newest_query(folders)}) n "
            f"ON {row_key_sql('i.key')} = n.key AND i.root = n.last")


def superseded(folders: Sequence[Store]) -> tuple[frozenset[str], ...]:
    """Per shard folder (dataset versions, oldest first), the keys of its samples that a later
    folder holds again or removed, as sets (what readers of a few shards at a time hold; the
    training loaders read them per shard: write_superseded). One DuckDB query over the index
    parts and changes; what it returns grows with the changes, not with the corpus."""
    if len(folders) == 1:
        return (frozenset(),)
    with folders[-1].duckdb() as (con, scratch):
        keys = dict(con.execute(f"SELECT root, list(key) FROM ({superseded_query(folders)}) GROUP BY root").fetchall())
    return tuple(frozenset(keys.get(i, ())) for i in range(len(folders)))


SUPERSEDED_SCHEMA = pa.schema([("root", pa.int32()), ("shard", pa.string()), ("key", pa.string())])
FOLDERS_KEY = "tessera.folders"  # its metadata: the folders it was written for


def write_superseded(folders: Sequence[Store], target: Store) -> None:
    """TARGET, a Parquet file: the (root, shard, key) of superseded samples, sorted by root and
    shard in small row groups, so a loader reads its shard's rows only (superseded_keys)."""
    with folders[-1].duckdb() as (con, scratch):
        local = f"{scratch}/superseded.parquet"
        tag = _folders_tag(folders).replace("'", "''")
        con.execute(f"COPY (SELECT * FROM ({superseded_query(folders)}) ORDER BY root, shard, key) TO '{local}' "
                    f"(FORMAT parquet, ROW_GROUP_SIZE 8192, KV_METADATA {{'{FOLDERS_KEY}': '{tag}'}})")
        target.put_file(local, "")


def superseded_written_for(target: Store, folders: Sequence[Store]) -> bool:
    """Whether TARGET is write_superseded's file for exactly these FOLDERS (it is kept with a
    training run, which evaluation and export read again)."""
    try:
        with target.open() as f:
            found = (pq.read_schema(f).metadata or {}).get(FOLDERS_KEY.encode())
    except (FileNotFoundError, pa.ArrowException):
        return False
    return found == _folders_tag(folders).encode()


def _folders_tag(folders: Sequence[Store]) -> str:
    return json.dumps([folder.url for folder in folders])


def superseded_keys(source: Store | None, root: int, shard: str) -> frozenset[str]:
    """The keys of one shard that later folders replaced or removed, from write_superseded's file
    (None: one folder, none)."""
    if source is None:
        return frozenset()
    table = source.read_parquet("", ["key"], (pc.field("root") == root) & (pc.field("shard") == shard),
                                SUPERSEDED_SCHEMA)
    return frozenset(table.column("key").to_pylist())
