"""What the embedding stage leaves in a shard folder, each name said once, and how readers
read it (light imports: training, reports and readers use it without the encoders or Ray).

    SHARDS/shard-NNNNNN.emb.parquet  the shard's sidecar: `key`, one vector column per modality
                                     (null where the sample lacks it), `video_frames` when
                                     kept; schema metadata: its digest, encoders and widths,
                                     and the keys whose vectors are missing (not current then)
    SHARDS/embed-plan.parquet        while the stage runs: the shard that computes each payload
    SHARDS/embed-cache/              the embedding cache, unless embed.cache names another place
    SHARDS/embed-summary.json        EmbedSummary, written last

and what curation (`tessera curate`, features/curate.py) leaves there:

    SHARDS/rejects/curated.parquet   the samples it dropped (reject lines, with the kept key)
    SHARDS/curate/outliers.parquet   samples far from their cluster: key, modality, score
    SHARDS/curate/summary.json       CurateSummary, written last
    SHARDS/curate/clusters/, pairs/  while it runs: vectors by cluster, the pairs found
    SHARDS/curate/superseded.parquet while it runs over refresh versions: keys later ones replaced

and the encoders as an all-ONNX bundle (`tessera export --bundle`, in EXPORT/encoders/):

    bundle.json                      per modality: the torch encoder's identity, width, config
                                     (its preparation) and graph; the graphs' files and bytes
    text.onnx, text-int8.onnx, ...   one graph per encoder (video runs image's), fp32 and int8
    tokenizer.json                   the text model's tokenizer"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from tessera.core.storage import Store
from tessera.core.summary import StageSummary
from tessera.preprocess.layout import REJECTS

EMBED_SUMMARY = "embed-summary.json"
PLAN = "embed-plan.parquet"
CACHE = "embed-cache"
SIDECAR_SUFFIX = ".emb.parquet"
SIDECARS = "shard-*" + SIDECAR_SUFFIX  # every sidecar, as a pattern
CURATE = "curate"
CURATED = f"{REJECTS}/curated.parquet"
OUTLIERS = f"{CURATE}/outliers.parquet"
CURATE_CLUSTERS = f"{CURATE}/clusters"
CURATE_PAIRS = f"{CURATE}/pairs"
CURATE_SUPERSEDED = f"{CURATE}/superseded.parquet"  # while it runs over versions: keys later ones replaced
# the sidecar's schema metadata; a sidecar some of whose vectors are missing (their batch
# failed) has its digest prefixed INCOMPLETE, so it is never current, and lists them in MISSING
DIGEST, ENCODERS, DIMS, MISSING = "tessera.digest", "tessera.encoders", "tessera.dims", "tessera.missing"
INCOMPLETE = "incomplete:"

def sidecar_name(shard: str) -> str:
    """The sidecar of a shard ('shard-000003.tar' or its stem)."""
    return shard.removesuffix(".tar") + SIDECAR_SUFFIX


def read_sidecar(shards: Store, shard: str, columns: list[str] | None = None) -> pa.Table:
    with shards.open(sidecar_name(shard)) as f:
        return pq.read_table(f, columns=columns)


def sidecar_digest(shards: Store, shard: str) -> str | None:
    """The digest a shard's sidecar was written for (None: no readable sidecar)."""
    try:
        with shards.open(sidecar_name(shard)) as f:
            metadata = pq.read_schema(f).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    return metadata.get(DIGEST.encode(), b"").decode()


@dataclass(frozen=True)
class EmbedSummary(StageSummary):
    """embed-summary.json: what an embedding stage run found and did. `config` and `encoders`
    rebuild these encoders (tessera export / predict); `up_to_date`: nothing was written."""

    FILE = EMBED_SUMMARY

    samples: int
    shards: int
    sidecars_written: int
    sidecars_up_to_date: int
    encoders: dict[str, str]
    config: dict
    dims: dict[str, int]
    modalities: dict[str, dict]
    computed: int
    cache_hits: int
    errors: int = 0  # vectors this run could not compute (their sidecars are incomplete)
    error_reasons: dict[str, int] = field(default_factory=dict)
    rounds: int = 0  # of embedding: a later one redoes what an earlier one left missing
    cache_rows: dict[str, int] | None = None
    cache_corrupt: list[str] = field(default_factory=list)
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class CurateSummary(StageSummary):
    """curate/summary.json: per modality, the k-means clusters, the semantic duplicates dropped,
    the outliers flagged, and the histogram of each compared sample's highest cosine within its
    cluster (HISTOGRAM_BINS bins over [-1, 1]); `digest`: the config and embeddings it is for."""

    FILE = f"{CURATE}/summary.json"

    digest: str
    clusters: dict[str, int]
    semantic_duplicates: dict[str, int]
    outliers: dict[str, int]
    outliers_dropped: bool
    eps: float
    histogram: dict[str, list[int]]
