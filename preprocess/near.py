"""Near-duplicate dedup: fingerprints taken while a shard task has each input in hand, and the
pass that compares them after every shard is committed (part of the dedup task).

- images: a 64-bit pHash (imagehash) of the decoded, upright image, before any resize or
  augmentation; near copies differ in at most `max_distance` bits. Candidates come from a
  join on blocks of bits: split the 64 bits into max_distance + k blocks, and two hashes
  within the distance agree on at least k whole blocks (pigeonhole), so a join on every
  k-combination of blocks finds every such pair — k is chosen for the least expected work
  (more combinations, or more random pairs meeting in a bucket).
- text: MinHash signatures (rensa) of character shingles, candidates from LSH bands, each
  candidate verified on the whole signature (estimated Jaccard >= threshold).

Verified pairs form a graph; in each connected component the earliest sample (manifest file,
line, key: a volume's slices in order) is kept and the others are dropped naming it, as exact
dedup does. Images first, then texts among the rows images kept. Everything is a DuckDB join over the index parts
(out-of-core); Python sees only the verified pairs."""

from __future__ import annotations

from functools import cache
from itertools import combinations
from math import comb
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tessera.core.keys import part_named_sql, same_sample
from tessera.preprocess.config import NearDedupConfig, NearTextConfig

if TYPE_CHECKING:
    import pyarrow as pa

PHASH_BITS = 64
MAX_COMBINATIONS = 128  # block combinations joined at most (each is a pass over the hashes)
MINHASH_SEED = 0  # part of what a signature means: signatures of one seed compare


def image_phash(img: Image.Image) -> int:
    """The image's 64-bit pHash as a signed int64 (what Parquet and DuckDB store)."""
    import imagehash

    bits = np.packbits(imagehash.phash(img).hash.flatten())
    return int.from_bytes(bits.tobytes(), "big", signed=True)


def shingles(text: str, size: int) -> list[str]:
    """Character SIZE-grams of the lowercased text with its whitespace collapsed: short
    captions yield enough of them for one changed word to leave most in common."""
    text = " ".join(text.lower().split())
    return [text[i:i + size] for i in range(max(1, len(text) - size + 1))]


def text_minhashes(texts: list[str], cfg: NearTextConfig) -> list[list[int]]:
    """MinHash signatures (num_perm uint32 values each) of TEXTS, computed in bulk."""
    import rensa

    if not texts:
        return []
    return rensa.RMinHash.digests_from_token_sets([shingles(t, cfg.shingle_chars) for t in texts],
                                                  num_perm=cfg.num_perm, seed=MINHASH_SEED)


@cache
def lsh_bands(threshold: float, num_perm: int, bands: int | None) -> tuple[int, int]:
    """(bands, rows per band): given, or datasketch's optimum for the threshold with false
    negatives weighted 9 to 1 (a false positive costs only its verification)."""
    if bands is not None:
        return bands, num_perm // bands
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


def block_masks(max_distance: int, hashes: int) -> list[int]:
    """The bit masks (signed int64) of the block combinations the image join runs on, for a
    join over HASHES hashes: k (blocks a pair must share) is the one of least expected work —
    one join row per hash and combination, plus the random pairs that meet in a bucket, about
    combinations x hashes^2 / 2^(bits + 1) — among those of at most MAX_COMBINATIONS."""

    def work(k: int) -> float:
        bits = PHASH_BITS * k / (max_distance + k)
        return comb(max_distance + k, k) * hashes * (1 + hashes / 2 ** (bits + 1))

    candidates = [k for k in range(1, PHASH_BITS - max_distance + 1) if comb(max_distance + k, k) <= MAX_COMBINATIONS]
    chosen = min(candidates or [1], key=work)
    blocks = max_distance + chosen
    edges = [round(PHASH_BITS * j / blocks) for j in range(blocks + 1)]
    block = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges, edges[1:], strict=False)]
    masks = []
    for combo in combinations(block, chosen):
        mask = 0
        for b in combo:
            mask |= b
        masks.append(mask - (1 << 64) if mask >= 1 << 63 else mask)
    return masks


def components(edges: dict[str, np.ndarray]) -> pa.Table:
    """(id, root) for every id of a connected component but its smallest, the root, from the
    EDGES' `a` and `b` ids (DuckDB's fetchnumpy)."""
    import pyarrow as pa  # (here: the image path imports this module, and predict needs no pyarrow)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = np.asarray(edges["a"], np.int64), np.asarray(edges["b"], np.int64)
    if not len(a):
        return pa.table({"id": pa.array([], pa.int64()), "root": pa.array([], pa.int64())})
    nodes, pairs = np.unique(np.concatenate([a, b]), return_inverse=True)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(a), np.int8), (pairs[:len(a)], pairs[len(a):])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    root = np.full(label.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(root, label, nodes)  # nodes are sorted ids: the smallest is the earliest row
    roots = root[label]
    dropped = nodes != roots
    return pa.table({"id": nodes[dropped], "root": roots[dropped]})


_DROPS = """
SELECT r.source_key AS key, r.key AS sample_key, r.file, r.line, '{modality}' AS modality,
       'dedup.near_duplicate' AS code,
       'near-duplicate of ''' || k.source_key || '''' || {part} ||
         CASE WHEN k.current THEN '' ELSE ' of version ' || k.version END ||
         ' ({modality} ' || {measure} || ')' AS reason,
       r.shard, k.key AS duplicate_of, {measure} AS measure
FROM {components} c JOIN near_rows r ON r.id = c.id JOIN near_rows k ON k.id = c.root
WHERE r.current
"""


def find_near_duplicates(con, cfg: NearDedupConfig, exact: str, local: str, prior: str | None = None) -> None:
    """Write to LOCAL (Parquet, the duplicates schema) the rows near copies drop, among the index
    rows (view `idx`) not already in EXACT (the exact pass's drops), compared with each other and
    with PRIOR (a table of earlier versions' live rows, with `root` and `version`: they come
    first, and are never dropped here)."""
    fingerprinted = "(image_phash IS NOT NULL OR text_minhash IS NOT NULL)"
    earlier = (f"UNION ALL SELECT source_key, key, file, line, shard, image_phash, text_minhash, root, version, "
               f"FALSE FROM {prior} WHERE {fingerprinted}") if prior else ""
    con.execute(f"""CREATE TEMP TABLE near_rows AS
        SELECT row_number() OVER (ORDER BY root, file, line, key) AS id, * FROM (
            SELECT source_key, key, file, line, shard, image_phash, text_minhash, 2147483647 AS root,
                   NULL::VARCHAR AS version, TRUE AS current
            FROM idx i WHERE {fingerprinted}
              AND NOT EXISTS (SELECT 1 FROM read_parquet('{exact}') d WHERE {same_sample("d", "i")})
            {earlier})""")
    drops = []
    if cfg.image.max_distance is not None:
        hashes = con.execute("SELECT count(*) FROM near_rows WHERE image_phash IS NOT NULL").fetchone()[0]
        masks = ", ".join(f"({n}, ({m})::BIGINT)"
                          for n, m in enumerate(block_masks(cfg.image.max_distance, hashes)))
        edges = con.execute(f"""
            WITH buckets AS (
                SELECT id, image_phash AS h, combo, image_phash & mask AS bucket
                FROM near_rows, (VALUES {masks}) m(combo, mask) WHERE image_phash IS NOT NULL)
            SELECT DISTINCT x.id AS a, y.id AS b FROM buckets x JOIN buckets y
              ON x.combo = y.combo AND x.bucket = y.bucket AND x.id < y.id
            WHERE bit_count(xor(x.h, y.h)) <= {cfg.image.max_distance}""").fetchnumpy()
        con.register("image_components", components(edges))
        con.execute("CREATE TEMP TABLE image_drops AS " + _DROPS.format(
            modality="image", components="image_components", part=part_named_sql("k.key"),
            measure="'phash distance ' || bit_count(xor(r.image_phash, k.image_phash))"))
        drops.append("image_drops")
    if cfg.text.threshold is not None:
        text = cfg.text
        bands, rows = lsh_bands(text.threshold, text.num_perm, text.bands)
        already = ("AND (NOT n.current OR NOT EXISTS (SELECT 1 FROM image_drops d "
                   f"WHERE {same_sample('d', 'n')}))") if drops else ""
        same = "len(list_filter(list_zip(x.text_minhash, y.text_minhash), lambda p: p[1] = p[2]))"
        # in steps, each materialized (spillable): bands -> candidate pairs (ids only) -> the
        # candidates verified on their signatures, which only they fetch
        con.execute(f"""CREATE TEMP TABLE text_buckets AS
            SELECT id, band, hash(list_slice(text_minhash, band * {rows} + 1, band * {rows} + {rows})) AS bucket
            FROM near_rows n, range({bands}) t(band) WHERE text_minhash IS NOT NULL {already}""")
        con.execute("""CREATE TEMP TABLE text_candidates AS SELECT DISTINCT x.id AS a, y.id AS b
            FROM text_buckets x JOIN text_buckets y ON x.band = y.band AND x.bucket = y.bucket AND x.id < y.id""")
        con.execute("DROP TABLE text_buckets")
        edges = con.execute(f"""SELECT a, b FROM text_candidates
            JOIN near_rows x ON x.id = a JOIN near_rows y ON y.id = b
            WHERE {same} >= {text.threshold * text.num_perm}""").fetchnumpy()
        con.register("text_components", components(edges))
        estimate = "len(list_filter(list_zip(r.text_minhash, k.text_minhash), lambda p: p[1] = p[2]))"
        con.execute("CREATE TEMP TABLE text_drops AS " + _DROPS.format(
            modality="text", components="text_components", part=part_named_sql("k.key"),
            measure=f"'jaccard ' || round({estimate} / {text.num_perm}, 2)"))
        drops.append("text_drops")
    union = " UNION ALL ".join(f"SELECT * FROM {t}" for t in drops) or \
        f"SELECT * FROM read_parquet('{exact}') LIMIT 0"
    con.execute(f"COPY ({union}) TO '{local}' (FORMAT parquet)")
