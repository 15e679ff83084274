"""tessera's output as a Ray Dataset, for users who continue in their own code:

    from tessera.workflows.dataset import open_dataset
    ds = open_dataset("s3://bucket/out")          # a job's OUT, a refresh's OUT or a shard folder
    ds = open_dataset(Store("s3://bucket/out", {"s3": {...}}))   # with storage options
    ds.take(1)  # key, label, text, image/audio/video bytes, <modality>_embedding, ...

One row per committed sample: duplicates, and keys a later refresh version replaced or removed,
are left out. Each shard is read by one task (index part, sidecar, tar), never the whole corpus."""

from __future__ import annotations

import pyarrow as pa

from tessera.core.errors import NotAnInput
from tessera.core.storage import Store
from tessera.core.versions import complete_versions, superseded
from tessera.features.layout import read_sidecar
from tessera.preprocess.layout import (
    ShardSummary,
    committed_shards,
    iter_shard,
    member_payload,
    read_index_part,
)
from tessera.preprocess.modality import member_extensions
from tessera.workflows.layout import SHARDS

PAYLOAD_TYPES = {"text": pa.string(), "image": pa.binary(), "audio": pa.binary(), "video": pa.binary()}


def shard_folders(out: Store) -> list[Store]:
    """The committed shard folders OUT holds, oldest first: OUT itself (a shard folder), OUT/shards
    (a `tessera run` OUT) or OUT/versions/v* (a `tessera refresh` OUT, complete versions only)."""
    if ShardSummary.exists(out):
        return [out]
    if ShardSummary.exists(out.child(SHARDS)):
        return [out.child(SHARDS)]
    complete = complete_versions(out)
    if complete:
        return [out.child(name) for name in complete]
    raise NotAnInput(f"{out.url} holds no tessera output (no {ShardSummary.FILE}, {SHARDS}/ or versions/)")


def read_shard(folder: Store, shard: str, excluded: frozenset[str]) -> pa.Table:
    """One shard's kept samples: index fields, each modality's payload, the sidecar's vectors."""
    index = read_index_part(folder, shard, ["key", "source_key", "label"])
    index = index.filter(pa.array([k not in excluded for k in index.column("key").to_pylist()], pa.bool_()))
    keys = index.column("key").to_pylist()
    wanted = set(keys)
    payloads: dict[str, dict[str, object]] = {m: {} for m in member_extensions()}
    meta: dict[str, bytes] = {}
    for sample in iter_shard(folder, shard, lambda member: member.partition(".")[0] in wanted):
        key = sample["__key__"]
        meta[key] = sample.get("json")
        for modality in member_extensions():
            data = member_payload(sample, modality)
            if data is not None:
                payloads[modality][key] = data.decode() if modality == "text" else data
    columns = {"key": index.column("key"), "source_key": index.column("source_key"), "label": index.column("label"),
               "shard": pa.array([folder.url_of(shard)] * len(keys), pa.string()),
               "json": pa.array([meta.get(k) for k in keys], pa.binary())}
    for modality, by_key in payloads.items():
        columns[modality] = pa.array([by_key.get(k) for k in keys], PAYLOAD_TYPES[modality])
    try:
        vectors = read_sidecar(folder, shard)
    except FileNotFoundError:  # not embedded
        return pa.table(columns)
    position = {k: i for i, k in enumerate(vectors.column("key").to_pylist())}
    take = pa.array([position.get(k) for k in keys], pa.int64())
    for name in vectors.column_names:
        if name in member_extensions():
            columns[f"{name}_embedding"] = vectors.column(name).take(take)
    return pa.table(columns)


def open_dataset(out: str | Store):
    """OUT's committed samples as a Ray Dataset (see the module doc); needs a Ray session
    (`ray.init()`; Ray Data starts a local one when there is none)."""
    import ray

    folders = shard_folders(out if isinstance(out, Store) else Store(out))
    excluded = superseded(folders)
    items = [{"root": i, "shard": name} for i, folder in enumerate(folders) for name in committed_shards(folder)]

    def read(batch: dict) -> pa.Table:
        tables = [read_shard(folders[i], shard, excluded[i])
                  for i, shard in zip(batch["root"], batch["shard"], strict=True)]
        return pa.concat_tables(tables, promote_options="default")

    return ray.data.from_items(items).map_batches(read, batch_size=1, batch_format="numpy")
