"""Which rows of several dataset versions are live when a row's input made several samples (a
volume's slices, keyed KEY/slice-NNN): the row's newest version decides for all of them."""

import pyarrow as pa

from tessera.core.keys import part_key, row_key_sql
from tessera.core.storage import Store
from tessera.core.versions import CHANGES, CHANGES_SCHEMA, INDEX, live_query, superseded
from tessera.preprocess.layout import INDEX_SCHEMA


def _version(folder: Store, keys: list[str], changes: list[tuple[str, str]] = ()) -> Store:
    rows = [{"key": k, "source_key": k.split("/")[0], "shard": "shard-000000.tar", "file": "m.jsonl", "line": 1,
             "modalities": ["image"]} for k in keys]
    folder.write_parquet(f"{INDEX}/shard-000000.parquet", pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
    if changes:
        table = pa.Table.from_pylist([{"version": 2, "key": k, "identity": "x", "change": c} for k, c in changes],
                                     schema=CHANGES_SCHEMA)
        folder.write_parquet(CHANGES, table)
    return folder


def test_a_rows_newest_version_decides_for_every_one_of_its_slices(tmp_path):
    first = _version(Store(str(tmp_path / "v1")), [part_key("vol", f"slice-{i:03d}") for i in range(4)] + ["ct", "x"])
    # the volume changed and now has one slice kept; x was removed; ct is untouched
    second = _version(Store(str(tmp_path / "v2")), [part_key("vol", "slice-000")], [("vol", "changed"),
                                                                                    ("x", "removed")])
    with second.duckdb() as (con, _):
        live = sorted(con.execute(f"SELECT key, root FROM ({live_query([first, second])})").fetchall())
        assert con.execute(f"SELECT {row_key_sql()} FROM (VALUES ('vol/slice-003'), ('ct')) t(key)").fetchall() \
            == [("vol",), ("ct",)]
    assert live == [("ct", 0), ("vol/slice-000", 1)]
    assert superseded([first, second]) == (frozenset({"vol/slice-000", "vol/slice-001", "vol/slice-002",
                                                      "vol/slice-003", "x"}), frozenset())
