"""tessera's output as a Ray Dataset, for users who continue in their own code:

    from workflows.dataset import open_dataset
    ds = open_dataset("s3://bucket/out")          # a job's OUT, a refresh's OUT or a shard folder
    ds.take(1)  # key, label, text, image/audio/video bytes, <modality>_embedding, ...

One row per committed sample: duplicates, and keys a later refresh version replaced or removed,
are left out. Each shard is read by one task (index part, sidecar, tar), never the whole corpus."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from features.sidecar import sidecar_name
from preprocess.layout import MEMBER_EXTENSIONS, SUMMARY, committed_shards, member_payload, read_index_part
from preprocess.storage import Store, iter_shard
from train.data import superseded
from workflows.refresh import versions

PAYLOAD_TYPES = {"text": pa.string(), "image": pa.binary(), "audio": pa.binary(), "video": pa.binary()}


def shard_folders(out: str, storage_options: dict | None = None) -> list[str]:
    """The committed shard folders OUT holds, oldest first: OUT itself (a shard folder), OUT/shards
    (a `tessera run` OUT) or OUT/versions/v* (a `tessera refresh` OUT, complete versions only)."""
    store = Store(out, storage_options)
    if store.exists(SUMMARY):
        return [store.url]
    if store.exists(f"shards/{SUMMARY}"):
        return [store.url_of("shards")]
    complete = versions(store.url, store.options)
    if complete:
        return [store.url_of("versions", v["version"]) for v in complete]
    raise FileNotFoundError(f"{store.url} holds no tessera output (no {SUMMARY}, shards/ or versions/)")


def read_shard(root: str, shard: str, excluded: frozenset[str], storage_options: dict) -> pa.Table:
    """One shard's kept samples: index fields, each modality's payload, the sidecar's vectors."""
    store = Store(root, storage_options)
    index = read_index_part(store, shard, ["key", "source_key", "label"])
    index = index.filter(pa.array([k not in excluded for k in index.column("key").to_pylist()], pa.bool_()))
    keys = index.column("key").to_pylist()
    wanted = set(keys)
    payloads: dict[str, dict[str, object]] = {m: {} for m in MEMBER_EXTENSIONS}
    meta: dict[str, bytes] = {}
    for sample in iter_shard(store.url_of(shard), storage_options,
                             lambda member: member.partition(".")[0] in wanted):
        key = sample["__key__"]
        meta[key] = sample.get("json")
        for modality in MEMBER_EXTENSIONS:
            data = member_payload(sample, modality)
            if data is not None:
                payloads[modality][key] = data.decode() if modality == "text" else data
    columns = {"key": index.column("key"), "source_key": index.column("source_key"), "label": index.column("label"),
               "shard": pa.array([store.url_of(shard)] * len(keys), pa.string()),
               "json": pa.array([meta.get(k) for k in keys], pa.binary())}
    for modality, by_key in payloads.items():
        columns[modality] = pa.array([by_key.get(k) for k in keys], PAYLOAD_TYPES[modality])
    sidecar = sidecar_name(shard)
    if store.exists(sidecar):
        with store.fs.open(store.path(sidecar), "rb") as f:
            vectors = pq.read_table(f)
        position = {k: i for i, k in enumerate(vectors.column("key").to_pylist())}
        take = pa.array([position.get(k) for k in keys], pa.int64())
        for name in vectors.column_names:
            if name in MEMBER_EXTENSIONS:
                columns[f"{name}_embedding"] = vectors.column(name).take(take)
    return pa.table(columns)


def open_dataset(out: str, storage_options: dict | None = None):
    """OUT's committed samples as a Ray Dataset (see the module doc); needs a Ray session
    (`ray.init()`; Ray Data starts a local one when there is none)."""
    import ray

    storage_options = storage_options or {}
    roots = shard_folders(out, storage_options)
    excluded = superseded(tuple(roots), storage_options)
    items = [{"root": i, "shard": name}
             for i, root in enumerate(roots) for name in committed_shards(Store(root, storage_options))]

    def read(batch: dict) -> pa.Table:
        tables = [read_shard(roots[i], shard, excluded[i], storage_options)
                  for i, shard in zip(batch["root"], batch["shard"], strict=True)]
        return pa.concat_tables(tables, promote_options="default")

    return ray.data.from_items(items).map_batches(read, batch_size=1, batch_format="numpy")
