"""Curation on the cached embeddings (`tessera curate SHARDS`): semantic dedup (SemDeDup) and
outliers, per modality, after the embedding stage — nothing is embedded again.

1. Fit: k-means (scikit-learn) on a sample of the sidecars' unit vectors, read from shards
   spread over the corpus (one Ray task).
2. Assign: Ray tasks per group of shards give each vector its nearest centroid and its cosine
   distance to it, and write the vectors grouped by cluster on the store
   (curate/clusters/<modality>/cluster-NNNNN/, one file per task).
3. Pairs: per cluster, Ray tasks compute the pairwise cosine of its vectors, block by block
   (a cluster larger than `block_rows` is split by a hash of the row into blocks, one task per
   pair of blocks, so a task's memory is bounded by the split, not by the cluster or N); each
   keeps the pairs at cosine >= 1 - eps and every row's highest similarity.
4. Finish (one Ray task, DuckDB over those files): connected components of the pairs, the
   earliest manifest row of each kept; the similarity histogram; outliers by a robust bound
   per cluster. The drops are marked in the index parts (`curated_out`, which every reader
   but embedding and curation skips) and listed in rejects/curated.parquet.

Text is compared only among text-only samples unless `with_media` (captions of media are often
boilerplate). Earliest is by (manifest file, line): the same result for any worker count."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from tessera.core.engine import Stage, StageRun, execute
from tessera.core.errors import NotAnInput
from tessera.core.keys import part_named_sql
from tessera.core.lease import DEFAULT_LEASE, Fence, LeaseConfig
from tessera.core.runner import task
from tessera.core.storage import Store
from tessera.core.versions import INDEX, KEPT, SHARD_KEPT, superseded_keys, version_name, write_superseded
from tessera.features.config import CurateConfig
from tessera.features.layout import (
    CURATE_CLUSTERS,
    CURATE_PAIRS,
    CURATED,
    OUTLIERS,
    SIDECARS,
    CurateSummary,
    EmbedSummary,
    read_sidecar,
)
from tessera.features.layout import (
    CURATE_SUPERSEDED as SUPERSEDED,
)
from tessera.preprocess.layout import (
    REJECTS,
    SHARD_FILES,
    check_damage,
    committed_shards,
    mark_index_parts,
    read_index_part,
    read_sizes,
    record_sizes,
)
from tessera.preprocess.near import components

log = logging.getLogger(__name__)

SHARDS_PER_TASK = 64  # shards one assignment task reads
HISTOGRAM_BINS = 50  # of the highest within-cluster cosine, over [-1, 1]
CURATE_KEYS = ["key", "source_key", "shard", "file", "line", "modalities"]
# modified z-score (Iglewicz & Hoaglin): 0.6745 (d - median) / MAD
Z_SCALE = 0.6745


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


Part = tuple[int, str]  # (folder position: earlier versions first, the curated folder last; shard)


@dataclass(frozen=True)
class Folders:
    """What one curation compares: the live rows of EARLIER version folders (never dropped
    here) and the rows of the folder being curated (the last), and the file of the keys later
    versions superseded in the earlier ones (None: no earlier folders)."""

    stores: tuple[Store, ...]
    superseded: Store | None

    @property
    def current(self) -> int:
        return len(self.stores) - 1

    def version(self, root: int) -> str:
        return version_name(self.stores[root])

    def parts(self) -> list[Part]:
        return [(root, shard) for root, store in enumerate(self.stores) for shard in committed_shards(store)]


def shard_vectors(folders: Folders, part: Part, modality: str, with_media: bool) -> tuple[pa.Table, np.ndarray]:
    """The shard's samples that have a MODALITY vector (index fields, `root`, and `compared`:
    whether semantic dedup compares it) and their unit vectors. Of an earlier folder, its live
    rows only (kept by its own curation, not superseded since)."""
    root, shard = part
    store = folders.stores[root]
    current = root == folders.current
    index = read_index_part(store, shard, CURATE_KEYS, kept=SHARD_KEPT if current else KEPT)
    gone = frozenset() if current else superseded_keys(folders.superseded, root, shard)
    side = read_sidecar(store, shard, ["key", modality])
    vectors = dict(zip(side.column("key").to_pylist(), side.column(modality).to_pylist(), strict=True))
    rows, found = [], []
    for i, key in enumerate(index.column("key").to_pylist()):
        if vectors.get(key) is not None and key not in gone:
            rows.append(i)
            found.append(vectors[key])
    table = index.take(rows)
    alone = [m == [modality] for m in table.column("modalities").to_pylist()]
    compared = [with_media or modality != "text" or a for a in alone]
    table = (table.drop_columns(["modalities"]).append_column("compared", pa.array(compared, pa.bool_()))
             .append_column("root", pa.array([root] * len(table), pa.int32())))
    return table, _unit(np.asarray(found, np.float32).reshape(len(found), -1))


def fit_centroids(folders: Folders, parts: list[Part], modality: str, cfg: CurateConfig, total: int) -> np.ndarray:
    """k-means centroids (unit vectors) fitted on up to cfg.sample_size vectors read from
    shards spread evenly over PARTS."""
    from sklearn.cluster import KMeans

    per_shard = max(1, total // max(1, len(parts)))
    step = max(1, len(parts) * per_shard // cfg.sample_size)
    sample: list[np.ndarray] = []
    for part in parts[::step]:
        sample.append(shard_vectors(folders, part, modality, True)[1])
        if sum(len(s) for s in sample) >= cfg.sample_size:
            break
    data = np.concatenate(sample)[:cfg.sample_size]
    wanted = cfg.semantic.clusters
    k = math.ceil(total / cfg.cluster_size) if wanted == "auto" else wanted
    k = max(1, min(k, len(np.unique(data, axis=0))))
    model = KMeans(n_clusters=k, n_init=3, random_state=cfg.seed).fit(data)
    return _unit(model.cluster_centers_.astype(np.float32))


@dataclass(frozen=True)
class Assigned:
    """What one assignment task wrote: rows per cluster."""

    rows: dict[int, int]


def assign_shards(folders: Folders, parts: list[Part], modality: str, centroids: np.ndarray, cfg: CurateConfig,
                  task_id: int) -> Assigned:
    """Write PARTS' vectors, grouped by nearest centroid, into the curated folder."""
    tables = []
    for part in parts:
        table, unit = shard_vectors(folders, part, modality, cfg.semantic.with_media)
        if not len(table):
            continue
        similarity = unit @ centroids.T
        cluster = similarity.argmax(axis=1)
        tables.append(table.append_column("cluster", pa.array(cluster, pa.int32()))
                      .append_column("distance", pa.array(1 - similarity.max(axis=1), pa.float32()))
                      .append_column("vector", pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1)),
                                                                                  unit.shape[1])))
    if not tables:
        return Assigned({})
    table = pa.concat_tables(tables).sort_by("cluster")
    counts: dict[int, int] = {}
    out = folders.stores[folders.current]
    for c in np.unique(table.column("cluster").to_numpy()):
        part = table.filter(pc.equal(table.column("cluster"), c))
        out.write_parquet(f"{CURATE_CLUSTERS}/{modality}/cluster-{c:05d}/part-{task_id:06d}.parquet", part)
        counts[int(c)] = len(part)
    return Assigned(counts)


# a sample's identity across folders, and its order: earliest first (core/keys.py: a manifest
# row may make several samples)
ROW = ["root", "file", "line", "key"]


def _block(table: pa.Table, blocks: int) -> np.ndarray:
    identities = zip(*(table.column(c).to_pylist() for c in ROW), strict=True)
    return np.array([zlib.crc32("\0".join(map(str, identity)).encode()) % blocks for identity in identities], np.int64)


def cluster_pairs(shards: Store, modality: str, cluster: int, blocks: int, pair: tuple[int, int],
                  cfg: CurateConfig) -> int:
    """Pairs of one cluster's blocks PAIR at cosine >= 1 - eps, and each row's highest cosine
    there, written under curate/pairs; returns the pairs found."""
    folder = f"{CURATE_CLUSTERS}/{modality}/cluster-{cluster:05d}"
    table = shards.dataset(shards.names(f"{folder}/*.parquet")).to_table(columns=[*ROW, "compared", "vector"])
    table = table.filter(table.column("compared"))
    block = _block(table, blocks)
    a, b = (table.take(np.flatnonzero(block == i)) for i in pair)
    va, vb = (np.asarray(t.column("vector").combine_chunks().flatten()).reshape(len(t), -1) for t in (a, b))
    sim = va @ vb.T if len(a) and len(b) else np.zeros((len(a), len(b)), np.float32)
    if pair[0] == pair[1]:
        np.fill_diagonal(sim, -np.inf)
    i, j = np.nonzero(sim >= 1 - cfg.semantic.eps)
    if pair[0] == pair[1]:
        i, j = i[i < j], j[i < j]
    edges = pa.table({**{f"{c}_a": a.column(c).take(i) for c in ROW}, **{f"{c}_b": b.column(c).take(j) for c in ROW},
                      "cosine": pa.array(sim[i, j], pa.float32())})
    best = [(t, s) for t, s in ((a, sim.max(axis=1, initial=-1)), (b, sim.max(axis=0, initial=-1))) if len(t)]
    highest = pa.concat_tables([pa.table({**{c: t.column(c) for c in ROW}, "cosine": pa.array(s, pa.float32())})
                                for t, s in best]) if best else None
    stem = f"{CURATE_PAIRS}/{modality}/cluster-{cluster:05d}-{pair[0]}-{pair[1]}"
    shards.write_parquet(stem + ".edges.parquet", edges)
    if highest is not None:
        shards.write_parquet(stem + ".best.parquet", highest)
    return len(edges)


_ROWS = "read_parquet({clusters}, union_by_name = true)"
NO_OUTLIERS = ("SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS sample_key, NULL::VARCHAR AS file, "
               "NULL::BIGINT AS line, NULL::VARCHAR AS modality, NULL::DOUBLE AS score, NULL::INT AS cluster, "
               "NULL::VARCHAR AS shard LIMIT 0")


@dataclass(frozen=True)
class CurateFound:
    """What the finishing task found, per modality, and the shards whose index parts change."""

    semantic_duplicates: dict[str, int] = field(default_factory=dict)
    outliers: dict[str, int] = field(default_factory=dict)
    histogram: dict[str, list[int]] = field(default_factory=dict)  # HISTOGRAM_BINS counts over [-1, 1]
    shards: list[str] = field(default_factory=list)


def finish(folders: Folders, cfg: CurateConfig, fitted: list[str], compared: list[str], fence: Fence
           ) -> CurateFound:
    """Components, kept rows, histogram and outliers from the files steps 2-3 wrote; writes
    rejects/curated.parquet and curate/outliers.parquet. Only the curated folder's rows are
    dropped or flagged; a group's earliest row may be an earlier version's, named with its
    version."""
    shards, current = folders.stores[folders.current], folders.current
    result = CurateFound()
    drops, outliers = [], []
    with shards.duckdb() as (con, scratch):
        for modality in fitted:
            rows = _ROWS.format(clusters=shards.sql_url(CURATE_CLUSTERS, modality, "*", "*.parquet"))
            versions = ", ".join(f"({root}, '{folders.version(root)}')" for root in range(len(folders.stores)))
            con.execute(f"CREATE OR REPLACE TEMP TABLE rows AS SELECT row_number() OVER (ORDER BY {', '.join(ROW)}) "
                        f"AS id, key, source_key, shard, root, v.version, root = {current} AS current, file, line, "
                        f"cluster, distance FROM {rows} JOIN (VALUES {versions}) v(r, version) ON v.r = root")
            if modality in compared:
                drops.append(_semantic(shards, con, modality, result, scratch, current))
                drops = [d for d in drops if d]
            if modality in cfg.outliers.modalities:
                outliers.append(_outliers(con, modality, cfg, scratch))
                result.outliers[modality] = con.execute(f"SELECT count(*) FROM '{outliers[-1]}'").fetchone()[0]
        local = f"{scratch}/curated.parquet"
        parts = [f"SELECT * FROM '{p}'" for p in drops]
        if cfg.outliers.drop:
            parts += [f"SELECT key, sample_key, file, line, modality, 'curate.outlier' AS code, "
                      f"'outlier (' || modality || ' score ' || "
                      f"round(score, 1) || ', over curate.outliers.bound {cfg.outliers.bound})' AS reason, "
                      f"shard, NULL::VARCHAR AS duplicate_of, NULL::FLOAT AS cosine FROM '{p}'" for p in outliers]
        empty = "SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS sample_key, NULL::VARCHAR AS file, " \
                "NULL::BIGINT AS line, NULL::VARCHAR AS modality, NULL::VARCHAR AS code, NULL::VARCHAR AS reason, " \
                "NULL::VARCHAR AS shard, NULL::VARCHAR AS duplicate_of, NULL::FLOAT AS cosine LIMIT 0"
        # a sample dropped for two modalities is listed once, for the first
        union = " UNION ALL BY NAME ".join(parts or [empty])
        con.execute(f"COPY (SELECT DISTINCT ON (file, line, sample_key) * FROM ({union}) "
                    f"ORDER BY file, line, sample_key, modality) "
                    f"TO '{local}' (FORMAT parquet)")
        flagged = f"{scratch}/outliers.parquet"
        union = " UNION ALL ".join(f"SELECT * FROM '{p}'" for p in outliers) or NO_OUTLIERS
        con.execute(f"COPY ({union}) TO '{flagged}' (FORMAT parquet)")
        result.shards.extend(s for (s,) in con.execute(f"SELECT DISTINCT shard FROM '{local}' ORDER BY 1").fetchall())
        fence.check(CURATED)
        shards.put_file(local, CURATED)
        shards.put_file(flagged, OUTLIERS)
    return result


def _semantic(shards: Store, con, modality: str, result: CurateFound, scratch: str, current: int) -> str | None:
    """Semantic duplicates of MODALITY (a drop list in SCRATCH, None when nothing is compared);
    its counts and histogram into RESULT."""
    if not shards.names(f"{CURATE_PAIRS}/{modality}/*.best.parquet"):  # nothing it compares
        result.semantic_duplicates[modality] = 0
        result.histogram[modality] = [0] * HISTOGRAM_BINS
        return None
    folder = shards.sql_url(CURATE_PAIRS, modality, "*.edges.parquet")
    best = shards.sql_url(CURATE_PAIRS, modality, "*.best.parquet")
    on = " AND ".join(f"{{t}}.{c} = e.{c}_{{t}}" for c in ROW)
    edges = con.execute(f"""SELECT a.id AS a, b.id AS b FROM read_parquet({folder}) e
        JOIN rows a ON {on.format(t='a')} JOIN rows b ON {on.format(t='b')}""").fetchnumpy()
    con.register("semantic_components", components(edges))
    local = f"{scratch}/semantic-{modality}.parquet"
    con.execute(f"""COPY (
        WITH best AS (SELECT {', '.join(ROW)}, max(cosine) AS cosine FROM read_parquet({best}) GROUP BY ALL)
        SELECT r.source_key AS key, r.key AS sample_key, r.file, r.line, '{modality}' AS modality,
               'curate.semantic_duplicate' AS code, 'semantic duplicate of ''' || k.source_key || '''' ||
                 {part_named_sql("k.key")} ||
                 CASE WHEN k.current THEN '' ELSE ' of version ' || k.version END ||
                 ' ({modality} cosine ' || round(b.cosine, 2) || ')' AS reason,
               r.shard, k.key AS duplicate_of, b.cosine
        FROM semantic_components c JOIN rows r ON r.id = c.id JOIN rows k ON k.id = c.root
        JOIN best b ON {" AND ".join(f"b.{c} = r.{c}" for c in ROW)} WHERE r.current)
        TO '{local}' (FORMAT parquet)""")
    result.semantic_duplicates[modality] = con.execute(f"SELECT count(*) FROM '{local}'").fetchone()[0]
    counts = dict(con.execute(f"""SELECT least(floor((cosine + 1) / 2 * {HISTOGRAM_BINS}), {HISTOGRAM_BINS - 1})::INT,
        count(*) FROM (SELECT {', '.join(ROW)}, max(cosine) AS cosine FROM read_parquet({best})
                       WHERE root = {current} GROUP BY ALL)
        GROUP BY ALL""").fetchall())
    result.histogram[modality] = [counts.get(i, 0) for i in range(HISTOGRAM_BINS)]
    return local


def _outliers(con, modality: str, cfg: CurateConfig, scratch: str) -> str:
    local = f"{scratch}/outliers-{modality}.parquet"
    con.execute(f"""COPY (
        WITH spread AS (SELECT cluster, median(distance) AS m, mad(distance) AS d FROM rows GROUP BY cluster),
        scored AS (SELECT r.*, {Z_SCALE} * (r.distance - s.m) / s.d AS score FROM rows r JOIN spread s USING (cluster)
                   WHERE s.d > 0)
        SELECT source_key AS key, key AS sample_key, file, line, '{modality}' AS modality, score, cluster, shard
        FROM scored WHERE current AND score > {cfg.outliers.bound} ORDER BY file, line)
        TO '{local}' (FORMAT parquet)""")
    return local


def mark_curated(shards: Store, names: list[str], fence: Fence) -> int:
    """Set `curated_out` in the index parts of NAMES from rejects/curated.parquet (clearing what
    an earlier curation marked)."""
    return mark_index_parts(shards, names, CURATED, "reason", "curated_out", fence)


_fit = task(fit_centroids, num_cpus=1, max_retries=2)
_assign = task(assign_shards, num_cpus=1, scheduling_strategy="SPREAD")
_pairs = task(cluster_pairs, num_cpus=1, scheduling_strategy="SPREAD")
_finish = task(finish, num_cpus=1, max_retries=2)
_mark = task(mark_curated, num_cpus=1)


def curate_digest(stores: Sequence[Store], cfg: CurateConfig) -> str:
    """What curation's result depends on: its config and the embeddings it read (of the
    curated folder, the last, and of the earlier versions it is compared with)."""
    record = [cfg.model_dump(mode="json")]
    for store in stores:
        embed = EmbedSummary.read(store)
        record.append([store.url, embed.encoders, embed.samples, embed.shards,
                       store.read_json("summary.json")["config_digest"]])
    # the curated folder's index parts as last committed (with curation's marks): a shard the
    # shard stage wrote again since (damaged, then redone) has lost them, and is curated again
    sizes = read_sizes(stores[-1])
    record.append(sorted((name, size) for name, size in sizes.items() if name.startswith(f"{INDEX}/")))
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def current_curation(shards: Store, cfg: CurateConfig, earlier: Sequence[Store] = ()) -> CurateSummary | None:
    if not CurateSummary.exists(shards):
        return None
    summary = CurateSummary.read(shards)
    return summary.replace(up_to_date=True) if summary.digest == curate_digest([*earlier, shards], cfg) else None


class CurateStage(Stage[CurateSummary]):
    """Semantic dedup and outliers over SHARDS' embeddings — compared also with the live rows of
    EARLIER dataset versions (a refresh's), which are never dropped here. The shards must be
    embedded (tessera embed)."""

    command = "tessera curate"

    def __init__(self, shards: Store, cfg: CurateConfig, earlier: Sequence[Store] = ()):
        if not EmbedSummary.exists(shards):
            raise NotAnInput(f"{shards.url} has no embeddings: run tessera embed {shards.url} first")
        self.folder, self.cfg = shards, cfg
        self.earlier = [store for store in earlier if EmbedSummary.exists(store)]
        for store in (*self.earlier, shards):
            check_damage(store, (*SHARD_FILES, SIDECARS), "`tessera shard` and `tessera embed` (or the job that "
                         "made them) run again")

    def current(self) -> CurateSummary | None:
        return current_curation(self.folder, self.cfg, self.earlier)

    def run(self, run: StageRun) -> CurateSummary:
        shards, cfg, earlier = self.folder, self.cfg, self.earlier
        for stale in (CURATE_CLUSTERS, CURATE_PAIRS, SUPERSEDED):
            if shards.exists(stale):
                shards.remove(stale, recursive=True)
        superseded = None
        if earlier:  # the keys later versions replaced or removed, read per shard by the tasks
            superseded = shards.child(SUPERSEDED)
            write_superseded([*earlier, shards], superseded)
        folders = Folders((*earlier, shards), superseded)
        parts = folders.parts()
        embeds = [EmbedSummary.read(store) for store in folders.stores]
        clusters, compared = {}, []
        for modality in cfg.modalities:
            total = sum(embed.modalities.get(modality, {}).get("samples", 0) for embed in embeds)
            if not embeds[-1].modalities.get(modality, {}).get("samples", 0):
                log.warning("curate: no %s embeddings in %s; skipped", modality, shards.url)
                continue
            clusters[modality] = _cluster(run, folders, parts, modality, cfg, total)
            if modality in cfg.semantic.modalities:
                compared.append(modality)
        previous = set()
        if shards.exists(CURATED):
            previous = set(shards.read_parquet(CURATED, ["shard"]).column("shard").to_pylist())
        found = run.get(_finish.remote(folders, cfg, list(clusters), compared, run.fence))
        touched = sorted(previous | set(found.shards))
        run.get_all([_mark.remote(shards, touched[i:i + SHARDS_PER_TASK], run.fence)
                     for i in range(0, len(touched), SHARDS_PER_TASK)])
        for scratch in (CURATE_CLUSTERS, CURATE_PAIRS, SUPERSEDED):
            if shards.exists(scratch):
                shards.remove(scratch, recursive=True)
        record_sizes(shards, (f"{INDEX}/*.parquet", f"{REJECTS}/*.parquet"), run.fence)
        summary = CurateSummary(
            digest=curate_digest(folders.stores, cfg), clusters=clusters,
            semantic_duplicates=found.semantic_duplicates, outliers=found.outliers,
            outliers_dropped=cfg.outliers.drop, eps=cfg.semantic.eps, histogram=found.histogram)
        log.info("curate: %s semantic duplicates, %s outliers", summary.semantic_duplicates, summary.outliers)
        return summary


def run_curate_stage(shards: Store, cfg: CurateConfig, progress: bool = True,
                     lease: LeaseConfig | Fence = DEFAULT_LEASE, earlier: Sequence[Store] = ()) -> CurateSummary:
    """CurateStage through the engine, holding SHARDS' lease (or under LEASE, the fence of a
    caller that holds it); Ray must be initialized."""
    return execute(CurateStage(shards, cfg, earlier), lease, progress)


def _cluster(run: StageRun, folders: Folders, parts: list[Part], modality: str, cfg: CurateConfig,
             total: int) -> int:
    """Steps 1-3 for one modality; returns the number of clusters."""
    shards = folders.stores[folders.current]
    centroids = ray.put(run.get(_fit.remote(folders, parts, modality, cfg, total)))
    groups = [parts[i:i + SHARDS_PER_TASK] for i in range(0, len(parts), SHARDS_PER_TASK)]
    counts: Counter = Counter()
    bar = run.bar(f"curate {modality}: assign", total=len(groups), unit="group")

    def assigned(item, got: Assigned) -> None:
        bar.update()
        counts.update(got.rows)

    run.map(enumerate(groups), lambda item, _: _assign.remote(folders, item[1], modality, centroids, cfg, item[0]),
            assigned)
    bar.close()
    if modality in cfg.semantic.modalities:
        jobs = [(c, blocks, (i, j)) for c, n in sorted(counts.items())
                for blocks in [max(1, math.ceil(n / cfg.block_rows))]
                for i in range(blocks) for j in range(i, blocks)]
        bar = run.bar(f"curate {modality}: pairs", total=len(jobs), unit="block")
        run.map(jobs, lambda job, _: _pairs.remote(shards, modality, *job, cfg), lambda job, got: bar.update())
        bar.close()
    return len(ray.get(centroids))
