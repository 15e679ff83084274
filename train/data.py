"""Training input: committed shards streamed with their embedding sidecars, split by rank and
loader worker so that an epoch sees every sample of its split exactly once. The shards may
span several folders (the versions a refresh made): a key's newest copy wins, and a key a
later version removed is left out.

`DatasetInfo` counts each shard's trainable samples per split once (a streaming pass over the
index parts). An epoch is then the sequence of the split's samples, shards in a seeded
order; consumer c of the (rank x loader worker) consumers takes the contiguous block
[c*T/C, (c+1)*T/C) of it, reading only the shards its block touches, one at a time, through a
seeded shuffle buffer: a loader process holds one shard and the buffer, never the epoch.
Every consumer yields the same number of full batches: the few slots past the end of its
block are padding rows with weight 0 (no loss, no gradient, not counted as seen). A data
position is (epoch, batches consumed by the rank); resuming skips exactly those batches."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tessera.core.storage import Store
from tessera.core.versions import INDEX, live_query, superseded_keys, superseded_written_for, write_superseded
from tessera.features.layout import SIDECARS, EmbedSummary, read_sidecar
from tessera.preprocess.layout import (
    SHARD_CONFIG,
    SHARD_FILES,
    ShardSummary,
    check_damage,
    committed_shards,
    iter_shard,
    member_payload,
    read_index_part,
)
from tessera.preprocess.modality import member_extensions
from tessera.train.config import TaskConfig
from tessera.train.inputs import branch_pixels, pack_vectors
from tessera.train.tasks import LABEL, Task, pack_targets
from tessera.train.towers import TowerSpec

SPLITS = ("train", "val")


# Which keys validate: those whose hash bucket (in [0, 1)) is below a fraction, or in a
# [start, end) window of the range (one fold of a cross-validation).
ValSplit = float | tuple[float, float]


def val_window(val: ValSplit) -> tuple[float, float]:
    return (0.0, float(val)) if isinstance(val, int | float) else (float(val[0]), float(val[1]))


def split_of(key: str, val: ValSplit, group: str | None = None) -> str:
    """'val' for a stable share of keys by hash, so the split never moves between runs; a
    sample of a split GROUP (the index's split_group: a patient) goes where its group's hash
    says, so a group never straddles the split (or the cross-validation folds)."""
    start, end = val_window(val)
    bucket = int(hashlib.sha256((key if group is None else group).encode()).hexdigest()[:8], 16) / 2**32
    return "val" if start <= bucket < end else "train"


def _pixel_statistics(summaries: list[ShardSummary]) -> tuple[tuple, tuple]:
    """Per-channel mean and std over the images of every folder (pooled by pixel count)."""
    parts = [s.statistics["image"] for s in summaries if s.statistics["image"]["mean"]]
    total = sum(p["pixels"] for p in parts)
    if not total:
        return (0.5,) * 3, (0.25,) * 3
    mean = np.sum([np.array(p["mean"]) * p["pixels"] for p in parts], axis=0) / total
    square = np.sum([(np.array(p["std"]) ** 2 + np.array(p["mean"]) ** 2) * p["pixels"] for p in parts], axis=0)
    return tuple(mean.tolist()), tuple(np.sqrt(np.maximum(square / total - mean**2, 0)).tolist())


# an empty relation that gives a query over index parts written before the split_group column
# (none of them has it) that column, null
NO_GROUP = "SELECT NULL::VARCHAR AS split_group WHERE false"


def _index_columns(fields: list[str]) -> list[str]:
    """The index columns that hold these fields' values (the targets JSON only when asked for)."""
    return ["key", "shard", LABEL, "split_group"] + (["targets"] if fields != [LABEL] else [])


def _index_targets(batch, fields: list[str]) -> Iterator[tuple]:
    """(key, shard, label, {field: value}, split group) of an index batch's rows (_index_columns(fields))."""
    keys, names, labels, groups = (batch.column(c).to_pylist() for c in ("key", "shard", "label", "split_group"))
    targets = batch.column("targets").to_pylist() if fields != [LABEL] else [None] * len(keys)
    for key, name, label, found, group in zip(keys, names, labels, targets, groups, strict=True):
        values = json.loads(found) if found else {}
        yield key, name, label, {f: label if f == LABEL else values.get(f) for f in fields}, group


def _trainable(fields: list[str]):
    """The index filter that keeps the rows that may carry a target of these fields."""
    with_label = pc.field(LABEL).is_valid()
    return with_label if fields == [LABEL] else with_label | pc.field("targets").is_valid()


def _count(stores: Sequence[Store], listed: list[tuple[int, str]], fields: list[str], shard_config: dict,
           val: ValSplit) -> tuple[np.ndarray, dict[str, set], dict[str, np.ndarray]]:
    """From one DuckDB pass over every folder's index parts (spilling, never a Python loop over
    rows): per committed shard, its samples with a target of at least one field in each split;
    the labels found for each classification or multilabel field; each regression field's
    count, sum and sum of squares over the training split. The live rows count
    (preprocess/versions.py: `live_query`, the rule the loaders follow shard by shard)."""
    kinds = {LABEL: "classification", **{t["field"]: t["kind"] for t in shard_config.get("targets") or ()}}
    value = {f: (LABEL if f == LABEL else f"json_extract(targets, '$.\"{f}\"')") for f in fields}
    present = " OR ".join(f"{value[f]} IS NOT NULL" for f in fields)
    bucket = "('0x' || substr(sha256(coalesce(split_group, key)), 1, 8))::UBIGINT / 4294967296.0"  # split_of's
    has_parts = any(store.names(f"{INDEX}/shard-*.parquet") for store in stores)
    start, end = val_window(val)
    query = (f"SELECT root, shard, key, label, targets, {bucket} >= {start!r} AND {bucket} < {end!r} AS val "
             f"FROM ({live_query(stores)} UNION ALL BY NAME {NO_GROUP}) WHERE {present}") if has_parts else ""
    per_shard = np.zeros((len(listed), 2), np.int64)
    found: dict[str, set] = {f: set() for f in fields}
    moments = {f: np.zeros(3) for f in fields}  # n, sum, sum of squares (training split)
    if not has_parts:
        return per_shard, found, moments
    with stores[-1].duckdb() as (con, _):
        con.execute(f"CREATE TEMP TABLE rows AS {query}")
        position = {shard: n for n, shard in enumerate(listed)}
        for root, shard, train, val in con.execute("SELECT root, shard, count(*) FILTER (WHERE NOT val), "
                                                   "count(*) FILTER (WHERE val) FROM rows GROUP BY root, shard"
                                                   ).fetchall():
            if (root, shard) in position:  # (an index part whose shard was never committed is no data)
                per_shard[position[(root, shard)]] = (train, val)
        for f in fields:
            if kinds.get(f) == "regression":
                n, total, squares = con.execute(
                    f"SELECT count(v), sum(v), sum(v * v) FROM (SELECT {value[f]}::DOUBLE AS v FROM rows "
                    "WHERE NOT val) WHERE v IS NOT NULL").fetchone()
                moments[f] = np.array([n, total or 0.0, squares or 0.0])
            else:
                labels = f"unnest({value[f]}::VARCHAR[])" if kinds.get(f) == "multilabel" else (
                    LABEL if f == LABEL else f"json_extract_string(targets, '$.\"{f}\"')")
                found[f] = {v for (v,) in con.execute(f"SELECT DISTINCT {labels} FROM rows").fetchall()
                            if v is not None}
    return per_shard, found, moments


def resolve_tasks(configs: Sequence[TaskConfig], shard_config: dict, found: dict[str, set],
                  moments: dict[str, np.ndarray]) -> tuple[Task, ...]:
    """The tasks with their kinds and label sets (declared, or else the values found) and the
    regression targets' mean and standard deviation over the training split."""
    declared = {t["field"]: t for t in shard_config.get("targets") or ()}
    tasks = []
    for cfg in configs or (TaskConfig(name=LABEL),):
        field = cfg.source
        if field == LABEL:
            kind, labels = "classification", shard_config["labels"]
        elif field in declared:
            kind, labels = declared[field]["kind"], declared[field]["labels"]
        else:
            raise ValueError(f"task {cfg.name}: field {field!r} is neither `label` nor one of shard.targets "
                             f"({sorted(declared) or 'none declared'}); declare it there so that the shard stage "
                             "checks its values")
        center, scale = 0.0, 1.0
        if kind == "regression":
            n, total, squares = moments.get(field, np.zeros(3))
            center = total / n if n else 0.0
            spread = math.sqrt(max(squares / n - center**2, 0.0)) if n else 0.0
            scale = spread if spread > 1e-8 else 1.0
        names = () if kind == "regression" else tuple(labels) if labels else tuple(sorted(found.get(field, ())))
        if kind != "regression" and not names:
            raise ValueError(f"task {cfg.name}: no sample carries a value of {field!r}, so it has no classes")
        tasks.append(Task(cfg.name, field, kind, names, cfg.weight, float(center), float(scale)))
    return tuple(tasks)


@dataclass(frozen=True)
class DatasetInfo:
    """What a worker needs to know about the shard folders, read once on the driver: per
    shard, not per sample (but for the keys later versions replaced or removed)."""

    folders: tuple[Store, ...]  # shard folders, oldest version first
    shards: tuple[tuple[int, str], ...]  # (folder position, tar name) of every committed shard
    per_shard: np.ndarray  # [shards, 2]: trainable samples of each split (train, val)
    superseded: Store | None  # the keys later folders replaced or removed (a file, per shard; None: one folder)
    tasks: tuple[Task, ...]
    dims: dict[str, int]  # modality -> embedding width, in input order
    counts: dict[str, int]  # split -> samples with a target of at least one task
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    val_split: ValSplit
    embed_config: str = "{}"  # EmbedConfig JSON the newest folder was embedded with (its encoders: the towers)

    @classmethod
    def read(cls, shards: Store | Sequence[Store], modalities: tuple[str, ...], val_split: ValSplit,
             tasks: Sequence[TaskConfig] = (), superseded: Store | None = None) -> DatasetInfo:
        """SHARDS (one folder, or versions oldest first); with several, SUPERSEDED is where the
        keys later versions replaced or removed are written (a Parquet file the loaders read
        per shard; a run keeps it as RUN/superseded.parquet), unless it holds them already."""
        stores = (shards,) if isinstance(shards, Store) else tuple(shards)
        if not stores:
            raise ValueError("no shard folders to train on")
        if len(stores) > 1 and superseded is None:
            raise ValueError("several shard folders need a place for the keys later ones supersede")
        for store in stores:  # (before anything reads them: a cut file fails late, naming none)
            check_damage(store, (*SHARD_FILES, SIDECARS), "`tessera shard` and `tessera embed` (or the job that "
                         "made them: tessera run, tessera refresh) run again")
        urls = [s.url for s in stores]
        summaries = [ShardSummary.read(s) for s in stores]
        shard_configs = [s.read_json(SHARD_CONFIG)["config"] for s in stores]
        target_sets = [{"labels": c["labels"], "targets": c.get("targets") or []} for c in shard_configs]
        embedded = [EmbedSummary.read(s) for s in stores]
        dim_sets = [e.dims for e in embedded]
        for what, values in (("labels and targets", target_sets), ("embedding widths", dim_sets)):
            if any(v != values[0] for v in values):
                raise ValueError(f"the shard folders differ in their {what} ({dict(zip(urls, values, strict=True))}): "
                                 "they cannot be trained on together")
        dims = {m: dim_sets[0][m] for m in modalities if m in dim_sets[0]}
        if not dims:
            raise ValueError(f"{urls[-1]} has no embeddings for any of {list(modalities)}: run `tessera embed` first")
        fields = list(dict.fromkeys(t.source for t in tasks)) or [LABEL]
        if len(stores) > 1 and not superseded_written_for(superseded, stores):
            write_superseded(stores, superseded)
        listed = [(i, name) for i, store in enumerate(stores) for name in committed_shards(store)]
        per_shard, found, moments = _count(stores, listed, fields, shard_configs[0], val_split)
        counts = {"train": int(per_shard[:, 0].sum()), "val": int(per_shard[:, 1].sum())}
        counts["all"] = counts["train"] + counts["val"]
        mean, std = _pixel_statistics(summaries)
        return cls(stores, tuple(listed), per_shard, superseded if len(stores) > 1 else None,
                   resolve_tasks(tasks, shard_configs[0], found, moments), dims, counts, mean, std, val_split,
                   json.dumps(embedded[-1].config))

    @property
    def fields(self) -> list[str]:
        return list(dict.fromkeys(t.field for t in self.tasks))

    def shard_url(self, n: int) -> str:
        root, name = self.shards[n]
        return self.folders[root].url_of(name)

    def samples(self, n: int, split: str) -> int:
        return int(self.per_shard[n].sum()) if split == "all" else int(self.per_shard[n, SPLITS.index(split)])


@dataclass(frozen=True)
class StreamSpec:
    info: DatasetInfo
    split: str  # train, val, or all (every sample with a target, for evaluation on other shards)
    val_split: ValSplit
    batch_size: int
    shuffle_buffer: int
    seed: int
    image_branch_size: int | None  # None: no pixels
    rank: int = 0
    world: int = 1
    loader_workers: int = 1  # consumers per rank (>= 1 even when the DataLoader uses none)
    batch_multiple: int = 1  # batches per rank are a multiple of this (gradient accumulation)
    towers: TowerSpec | None = None  # fine-tuned towers: their inputs are made from the shards' members

    @property
    def member_modalities(self) -> tuple[str, ...]:
        """The modalities whose members (not only vectors) a batch needs."""
        wanted = set(self.towers.modalities if self.towers else ()) | ({"image"} if self.image_branch_size else set())
        return tuple(m for m in self.info.dims if m in wanted)

    @property
    def consumers(self) -> int:
        return self.world * self.loader_workers

    @property
    def batches_per_consumer(self) -> int:
        per_consumer = math.ceil(self.info.counts[self.split] / self.consumers)
        batches = math.ceil(per_consumer / self.batch_size)
        # a rank's batches (loader_workers x this) must be a multiple of batch_multiple
        step = self.batch_multiple // math.gcd(self.batch_multiple, self.loader_workers)
        return max(step, math.ceil(batches / step) * step)

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_consumer * self.loader_workers


class ShardStream(IterableDataset):
    """A rank's batches from (epoch, batch `start`) to the end of epoch `last_epoch - 1`.

    One stream spans every remaining epoch, so DataLoader workers start once per run."""

    def __init__(self, spec: StreamSpec, epoch: int, start: int = 0, last_epoch: int | None = None):
        self.spec, self.epoch, self.start = spec, epoch, start
        self.last_epoch = epoch + 1 if last_epoch is None else last_epoch

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's shards (those with samples of the split), in a seeded order."""
        info = self.spec.info
        order = np.array([n for n in range(len(info.shards)) if info.samples(n, self.spec.split)], np.int64)
        np.random.default_rng([self.spec.seed, epoch]).shuffle(order)
        return order

    def _rows(self, n: int) -> list[dict]:
        """The split's samples of shard n, in index order: key, packed targets and vectors, image."""
        spec, info = self.spec, self.spec.info
        root, name = info.shards[n]
        store = info.folders[root]
        fields = info.fields
        index = read_index_part(store, name, _index_columns(fields), _trainable(fields))
        chosen = []
        excluded = superseded_keys(info.superseded, root, name)
        for key, _, label, values, group in _index_targets(index, fields):
            packed = pack_targets(info.tasks, label, values)
            if packed is not None and key not in excluded \
                    and (spec.split == "all" or split_of(key, spec.val_split, group) == spec.split):
                chosen.append((key, *packed))
        table = read_sidecar(store, name, ["key", *info.dims])
        where = {key: i for i, key in enumerate(table.column("key").to_pylist())}
        if len(chosen) != info.samples(n, spec.split) or any(c[0] not in where for c in chosen):
            raise ValueError(f"{info.shard_url(n)}: its index and sidecar disagree with the dataset's counts; "
                             "run `tessera embed` again")
        take = np.array([where[c[0]] for c in chosen], np.int64)
        present = {}
        for modality, dim in info.dims.items():
            column = table.column(modality).combine_chunks().take(take)
            rows = column.is_valid().to_numpy(zero_copy_only=False)
            values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            present[modality] = (rows, values if len(values) == rows.sum() else values[rows])
        features, mask = pack_vectors(len(chosen), info.dims, present)
        members = self._members(store, name, {c[0] for c in chosen}, spec.member_modalities)
        return [{"key": key, "targets": targets, "present": has, "features": features[i], "mask": mask[i],
                 "members": members.get(key, {})} for i, (key, targets, has) in enumerate(chosen)]

    @staticmethod
    def _members(store: Store, shard: str, keys: set[str], modalities: tuple[str, ...]) -> dict[str, dict]:
        """key -> {modality: its member's bytes} of the shard's samples in KEYS (only these bytes read)."""
        if not modalities:
            return {}
        extensions = member_extensions()
        wanted = {ext for m in modalities for ext in extensions[m]}

        def select(member: str) -> bool:
            key, _, ext = member.partition(".")
            return key in keys and ext in wanted

        return {s["__key__"]: {m: member_payload(s, m) for m in modalities}
                for s in iter_shard(store, shard, select)}

    def _samples(self, consumer: int, epoch: int) -> Iterator[dict]:
        """Consumer's block of the epoch's sequence of samples, shard by shard."""
        spec, info = self.spec, self.spec.info
        order = self._order(epoch)
        ends = np.cumsum([info.samples(n, spec.split) for n in order])
        total = int(ends[-1]) if len(ends) else 0
        lo, hi = consumer * total // spec.consumers, (consumer + 1) * total // spec.consumers
        for position in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
            first = int(ends[position - 1]) if position else 0
            if first >= hi:
                return
            rows = self._rows(int(order[position]))
            yield from rows[max(lo - first, 0) : hi - first]

    def _shuffled(self, samples: Iterator[dict], consumer: int, epoch: int) -> Iterator[dict]:
        rng = np.random.default_rng([self.spec.seed, epoch, consumer, 1])
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.spec.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _collate(self, rows: list[dict], weights: list[float]) -> dict:
        batch = {"keys": [r["key"] for r in rows],
                 "features": torch.from_numpy(np.stack([r["features"] for r in rows])),
                 "mask": torch.from_numpy(np.stack([r["mask"] for r in rows])),
                 "targets": torch.from_numpy(np.stack([r["targets"] for r in rows])),
                 "present": torch.from_numpy(np.stack([r["present"] for r in rows])),
                 "weights": torch.tensor(weights, dtype=torch.float32)}
        if self.spec.image_branch_size:
            info = self.spec.info
            batch["pixels"] = torch.from_numpy(np.stack([
                branch_pixels(r["members"].get("image"), self.spec.image_branch_size, info.pixel_mean, info.pixel_std)
                for r in rows]))
        if self.spec.towers:
            batch["towers"] = self.spec.towers.batch([r["members"] for r in rows])
        return batch

    def consumer_batches(self, epoch: int, k: int) -> Iterator[tuple[list[dict], list[float]]]:
        """The batches of this rank's consumer k in an epoch, streamed; its batch i is the rank's
        batch i*workers + k. Past its samples, padding rows (a real row, weight 0)."""
        spec = self.spec
        consumer = spec.rank * spec.loader_workers + k
        batch: list[dict] = []
        made, last = 0, None
        for row in self._shuffled(self._samples(consumer, epoch), consumer, epoch):
            batch.append(row)
            last = row
            if len(batch) == spec.batch_size:
                yield batch, [1.0] * len(batch)
                batch, made = [], made + 1
        if made == spec.batches_per_consumer:
            return
        filler = last if last is not None else next(self._samples(0, epoch), None)
        real = len(batch)
        batch += [filler] * (spec.batch_size - real)
        yield batch, [1.0] * real + [0.0] * (spec.batch_size - real)
        for _ in range(spec.batches_per_consumer - made - 1):
            yield [filler] * spec.batch_size, [0.0] * spec.batch_size

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        per_rank, workers = spec.batches_per_rank, spec.loader_workers
        info = get_worker_info()
        me, processes = (info.id, info.num_workers) if info else (0, 1)
        total = (self.last_epoch - self.epoch) * per_rank - self.start
        streams: dict[tuple[int, int], list] = {}  # (epoch, consumer) -> [its batches, next batch index]
        # The DataLoader takes item g from process g % processes, so process `me` yields the
        # rank's items me, me + processes, ...; with one process per consumer that is always
        # the same consumer, whose batches then come in order, each made once.
        for g in range(me, total, processes):
            flat = self.start + g
            epoch, b = self.epoch + flat // per_rank, flat % per_rank
            k, i = b % workers, b // workers
            if (epoch, k) not in streams:
                streams = {key: v for key, v in streams.items() if key[0] == epoch}
                streams[(epoch, k)] = [self.consumer_batches(epoch, k), 0]
            stream = streams[(epoch, k)]
            started = time.perf_counter()
            while stream[1] < i:  # resuming: skip the batches already consumed
                next(stream[0])
                stream[1] += 1
            stream[1] += 1
            batch = self._collate(*next(stream[0]))
            batch["made_seconds"] = time.perf_counter() - started  # this loader process's work on it
            yield batch


# Loader processes start from a fork server (a clean single-threaded process that has imported
# this module), not by forking the rank: a rank holds Ray's, the store's I/O and torch's
# threads, and a child forked while one of them held a lock waits on it forever (CI: a loader
# process stuck inside botocore, started from an S3 store's event-loop thread).
LOADER_START = "forkserver"


def loader(spec: StreamSpec, epoch: int, start: int = 0, last_epoch: int | None = None) -> DataLoader:
    """The rank's batches in order from (epoch, start) to the end of last_epoch - 1 (default: epoch)."""
    workers = spec.loader_workers if spec.loader_workers > 1 else 0
    if workers:
        multiprocessing.set_forkserver_preload([__name__])
    return DataLoader(ShardStream(spec, epoch, start, last_epoch), batch_size=None, num_workers=workers,
                      prefetch_factor=4 if workers else None,
                      multiprocessing_context=LOADER_START if workers else None)
