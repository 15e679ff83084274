"""Exact dedup after the shard tasks, without a pass that reads the inputs again.

The shard tasks record each written sample's content id (sha256 over its raw inputs) in
their index parts, and each rejected row's claimed key in their rejects parts. This pass is
one DuckDB query over those parts (out-of-core: memory-limited, spilling to local scratch),
run in a Ray task beside the data, never on the driver:

1. duplicate keys: among the rows that claim a key, the earliest (manifest file, line) wins;
   a later one that was written is dropped ("duplicate key (first on line N)");
2. duplicate content: among the written key winners, the earliest row of each content id
   wins; the others are dropped ("duplicate content of 'KEY' (first on line N)").

Earliest is by manifest position, so the result is the same on every run and any number of
workers. The dropped rows go to rejects/duplicates.parquet (sorted by shard, with the key
they duplicate); then one Ray task per group of affected shards sets `duplicate_of` in their
index parts, which every reader filters on. The tars keep their bytes (rewriting them would
read every shard again): a reader that walks a tar without the index sees the duplicates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

from tessera.core.keys import part_named_sql, row_key_sql, same_sample
from tessera.core.lease import Fence
from tessera.core.storage import Store
from tessera.core.versions import INDEX, live_query, version_name
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.layout import DUPLICATES, REJECTS, mark_index_parts
from tessera.preprocess.near import find_near_duplicates

SHARDS_PER_TASK = 256  # index parts rewritten by one task

# Aggregates, not window functions: DuckDB's hash aggregates spill, so memory stays bounded.
# A row's place in the manifest is the struct {'file': .., 'line': ..}; the smallest is first.
_FIRST_ON = "(first on line ' || first.line || CASE WHEN first.file <> file THEN ' of ' || first.file ELSE '' END || ')"
QUERY = """
WITH claims AS (  -- a row claims its key (the samples of a volume's slices claim their row's)
    SELECT key, $row_key AS row_key, file, line, shard, source_key, content_id, TRUE AS written FROM idx
    UNION ALL
    SELECT sample_key, sample_key, file, line, NULL, key, NULL, FALSE FROM rej WHERE sample_key IS NOT NULL
), repeated_keys AS (
    SELECT row_key, min({'file': file, 'line': line}) AS first FROM claims GROUP BY row_key
    HAVING min({'file': file, 'line': line}) <> max({'file': file, 'line': line})
), key_dups AS (
    SELECT c.*, r.first FROM claims c JOIN repeated_keys r USING (row_key)
    WHERE c.written AND (c.file <> r.first.file OR c.line <> r.first.line)
), kept AS (
    SELECT * FROM claims c
    WHERE written AND $content AND NOT EXISTS (SELECT 1 FROM key_dups d WHERE d.file = c.file AND d.line = c.line)
), repeated_content AS (
    SELECT content_id, min({'file': file, 'line': line, 'key': key, 'source': source_key}) AS first
    FROM kept GROUP BY content_id HAVING count(*) > 1
), content_dups AS (  -- (kept keys are unique: the first's key says which row is first)
    SELECT k.*, r.first FROM kept k JOIN repeated_content r USING (content_id) WHERE k.key <> r.first.key
)
SELECT source_key AS key, key AS sample_key, file, line, NULL::VARCHAR AS modality,
       'dedup.duplicate_key' AS code, 'duplicate key $first_on' AS reason, shard, row_key AS duplicate_of
FROM key_dups
UNION ALL
SELECT source_key, key, file, line, NULL, 'dedup.duplicate_content',
       'duplicate content of ''' || first.source || '''' || $first_part || ' $first_on', shard, first.key
FROM content_dups
""".replace("$first_on", _FIRST_ON).replace("$row_key", row_key_sql()) \
    .replace("$first_part", part_named_sql("first.key"))


@dataclass(frozen=True)
class DedupResult:
    """What the dedup pass dropped, by reject code, and the shards that hold drops in groups of
    neighbouring shards (one index rewrite task each)."""

    rejected_by_code: dict[str, int]
    shard_groups: list[list[str]]

    @property
    def duplicates(self) -> int:
        return sum(self.rejected_by_code.values())


def find_duplicates(out: Store, cfg: ShardConfig, fence: Fence, earlier: Sequence[Store] = ()) -> DedupResult:
    """Write rejects/duplicates.parquet (exact, then near duplicates; against the live rows of
    the EARLIER dataset versions too, which always win). Every shard has both parts."""
    with out.duckdb() as (con, scratch):
        con.execute(f"CREATE VIEW idx AS SELECT * FROM read_parquet({out.sql_url(INDEX, 'shard-*.parquet')})")
        con.execute(f"CREATE VIEW rej AS SELECT * FROM read_parquet({out.sql_url(REJECTS, 'shard-*.parquet')})")
        exact, prior_exact, near, local = (f"{scratch}/{name}.parquet"
                                           for name in ("exact", "prior-exact", "near", "duplicates"))
        con.execute(f"COPY ({QUERY.replace('$content', str(cfg.dedup).upper())}) TO '{exact}' (FORMAT parquet)")
        prior = _prior_view(con, earlier, out)
        if prior and cfg.dedup:
            con.execute(f"COPY ({PRIOR_CONTENT.format(exact=exact)}) TO '{prior_exact}' (FORMAT parquet)")
            both = f"{scratch}/exact-all.parquet"
            con.execute(f"COPY (SELECT * FROM read_parquet(['{exact}', '{prior_exact}'], union_by_name = true)) "
                        f"TO '{both}' (FORMAT parquet)")
            exact = both
        find_near_duplicates(con, cfg.near_dedup, exact, near, prior)
        con.execute(f"COPY (SELECT * FROM read_parquet(['{exact}', '{near}'], union_by_name = true) "
                    f"ORDER BY shard, file, line) TO '{local}' (FORMAT parquet, ROW_GROUP_SIZE 8192)")
        found = dict(con.execute(f"SELECT code, count(*) FROM '{local}' GROUP BY ALL ORDER BY code").fetchall())
        shards = [s for (s,) in con.execute(
            f"SELECT DISTINCT shard FROM '{local}' ORDER BY length(shard), shard").fetchall()]
        fence.check(DUPLICATES)
        out.put_file(local, DUPLICATES)
    groups = [list(group) for _, group in groupby(shards, key=lambda s: _number(s) // SHARDS_PER_TASK)]
    return DedupResult(found, groups)


def _prior_view(con, earlier: Sequence[Store], out: Store) -> str | None:
    """A table `prior` of the EARLIER versions' live rows (OUT's rows supersede them too), with
    their version's position (`root`) and name."""
    if not any(folder.names(f"{INDEX}/shard-*.parquet") for folder in earlier):
        return None
    names = ", ".join(f"({i}, '{version_name(folder)}')" for i, folder in enumerate(earlier))
    con.execute(f"CREATE TEMP TABLE prior AS SELECT l.*, v.version FROM ({live_query([*earlier, out])}) l "
                f"JOIN (VALUES {names}) v(root, version) USING (root)")
    return "prior"


# a written row whose content an earlier version holds (live) is dropped naming that row
PRIOR_CONTENT = """
SELECT i.source_key AS key, i.key AS sample_key, i.file, i.line, NULL::VARCHAR AS modality,
       'dedup.duplicate_content' AS code,
       'duplicate content of ''' || p.first.source || '''' || {part} || ' of version ' || p.first.version AS reason,
       i.shard, p.first.key AS duplicate_of
FROM idx i JOIN (SELECT content_id, min({{'root': root, 'file': file, 'line': line, 'key': key,
                                          'source': source_key, 'version': version}}) AS first
                 FROM prior GROUP BY content_id) p USING (content_id)
WHERE NOT EXISTS (SELECT 1 FROM read_parquet('{exact}') d WHERE {same})
""".replace("{same}", same_sample("d", "i")).replace("{part}", part_named_sql("p.first.key"))

def _number(shard: str) -> int:
    return int(shard.removeprefix("shard-").removesuffix(".tar"))


def mark_duplicates(out: Store, shards: list[str], fence: Fence) -> int:
    """Set `duplicate_of` in the index parts of SHARDS from rejects/duplicates.parquet."""
    return mark_index_parts(out, shards, DUPLICATES, "duplicate_of", "duplicate_of", fence)
