"""Training input: committed shards streamed with their embedding sidecars, split by rank and
loader worker so that an epoch sees every sample of its split exactly once. The shards may
span several folders (the versions a refresh made), the newest copy of a key winning.

Within an epoch, shards come in a seeded order and samples are dealt round-robin to the
(rank x loader worker) consumers, each of which shuffles through a seeded buffer and batches.
Every consumer yields the same number of full batches: the few slots past the end of the
split are padding rows with weight 0 (no loss, no gradient, not counted as seen). A data
position is (epoch, batches consumed by the rank); resuming skips exactly those batches."""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from features.stage import EMBED_SUMMARY
from preprocess.layout import CHANGES, SHARD_CONFIG, SUMMARY, committed_shards, read_index
from preprocess.storage import Store, filesystem, iter_shard, join, parent, read_json


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a stable share of keys by hash, so the split never moves between runs."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    return "val" if bucket < val_fraction else "train"


def pack_vectors(n: int, dims: dict[str, int],
                 present: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The model's packed input: features [n, sum(dims)] (the modalities side by side, zeros
    where absent) and mask [n, modalities]; present[m] = (which rows have m, their vectors)."""
    features = np.zeros((n, sum(dims.values())), np.float32)
    mask = np.zeros((n, len(dims)), np.float32)
    offset = 0
    for j, (modality, dim) in enumerate(dims.items()):
        if modality in present:
            rows, values = present[modality]
            features[rows, offset : offset + dim] = values
            mask[rows, j] = 1.0
        offset += dim
    return features, mask


def branch_pixels(data: bytes | None, size: int, mean, std) -> np.ndarray:
    """A stored image as the image branch's input: 3 x size x size, normalized with the
    training data's statistics (zeros when the sample has no image)."""
    from PIL import Image

    if data is None:
        return np.zeros((3, size, size), np.float32)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR))
    x = (rgb.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def owned_index(roots: tuple[str, ...], storage_options: dict) -> pa.Table:
    """(key, label, shard, root) of every labelled sample over one or more shard folders
    (dataset versions, oldest first): duplicates excluded, a key in several folders taken from
    the newest, and a key that a later version removed (CHANGES) not at all."""
    taken, removed = [], []
    for position, root_url in enumerate(roots):
        store = Store(root_url, storage_options)
        part = read_index(store, ["key", "label", "shard"], pc.field("label").is_valid())
        taken.append(part.append_column("root", pa.array([position] * part.num_rows, pa.int32())))
        if store.exists(CHANGES):
            gone = pq.read_table(pa.BufferReader(store.read_bytes(CHANGES)), columns=["key", "change"],
                                 filters=[("change", "=", "removed")]).select(["key"])
            removed.append(gone.append_column("root", pa.array([position] * gone.num_rows, pa.int32())))
    rows = pa.concat_tables(taken)
    if len(roots) == 1:
        return rows
    events = pa.concat_tables([rows.select(["key", "root"]), *removed])
    last = events.group_by("key").aggregate([("root", "max")]).rename_columns(["key", "root"])
    return rows.join(last, keys=["key", "root"], join_type="inner").sort_by([("root", "ascending")])


def _pixel_statistics(summaries: list[dict]) -> tuple[tuple, tuple]:
    """Per-channel mean and std over the images of every folder (pooled by pixel count)."""
    parts = [s["statistics"]["image"] for s in summaries if s["statistics"]["image"]["mean"]]
    total = sum(p["pixels"] for p in parts)
    if not total:
        return (0.5,) * 3, (0.25,) * 3
    mean = np.sum([np.array(p["mean"]) * p["pixels"] for p in parts], axis=0) / total
    square = np.sum([(np.array(p["std"]) ** 2 + np.array(p["mean"]) ** 2) * p["pixels"] for p in parts], axis=0)
    return tuple(mean.tolist()), tuple(np.sqrt(np.maximum(square / total - mean**2, 0)).tolist())


@dataclass(frozen=True)
class DatasetInfo:
    """What a worker needs to know about the shard folders, read once on the driver."""

    roots: tuple[str, ...]  # shard folders, oldest version first
    shard_urls: tuple[str, ...]  # every committed tar
    labels: tuple[str, ...]
    dims: dict[str, int]  # modality -> embedding width, in input order
    counts: dict[str, int]  # split -> labelled samples
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    storage_options: dict

    @classmethod
    def read(cls, shards: str | Sequence[str], modalities: tuple[str, ...], val_fraction: float,
             storage_options: dict | None = None) -> DatasetInfo:
        storage_options = storage_options or {}
        roots = tuple(r.rstrip("/") for r in ((shards,) if isinstance(shards, str) else shards))
        if not roots:
            raise ValueError("no shard folders to train on")
        summaries, label_sets, dim_sets, urls = [], [], [], []
        for root_url in roots:
            fs, root = filesystem(root_url, storage_options)
            summaries.append(read_json(fs, join(root, SUMMARY)))
            label_sets.append(read_json(fs, join(root, SHARD_CONFIG))["config"]["labels"])
            dim_sets.append(read_json(fs, join(root, EMBED_SUMMARY))["dims"])
            urls += [join(root_url, name) for name in committed_shards(Store(root_url, storage_options))]
        for what, values in (("labels", label_sets), ("embedding widths", dim_sets)):
            if any(v != values[0] for v in values):
                raise ValueError(f"the shard folders differ in their {what} ({dict(zip(roots, values, strict=True))}): "
                                 "they cannot be trained on together")
        index = owned_index(roots, storage_options)
        labels = tuple(label_sets[0]) if label_sets[0] else tuple(sorted(pc.unique(index.column("label")).to_pylist()))
        dims = {m: dim_sets[0][m] for m in modalities if m in dim_sets[0]}
        if not dims:
            raise ValueError(f"{roots[-1]} has no embeddings for any of {list(modalities)}: run `tessera embed` first")
        splits = Counter(split_of(key, val_fraction) for key in index.column("key").to_pylist())
        counts = {"train": splits["train"], "val": splits["val"], "all": index.num_rows}
        mean, std = _pixel_statistics(summaries)
        return cls(roots, tuple(urls), labels, dims, counts, mean, std, storage_options)


@dataclass(frozen=True)
class StreamSpec:
    info: DatasetInfo
    split: str  # train, val, or all (every labelled sample, for evaluation on other shards)
    val_fraction: float
    batch_size: int
    shuffle_buffer: int
    seed: int
    image_branch_size: int | None  # None: no pixels
    rank: int = 0
    world: int = 1
    loader_workers: int = 1  # consumers per rank (>= 1 even when the DataLoader uses none)
    batch_multiple: int = 1  # batches per rank are a multiple of this (gradient accumulation)

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

    def _labels(self) -> dict[str, tuple[int, int]]:
        """key -> (folder position, class) of every labelled sample, read once per loader process."""
        if not hasattr(self, "_label_of"):
            info = self.spec.info
            index = owned_index(info.roots, info.storage_options)
            self._label_of = {key: (root, info.labels.index(label)) for key, root, label in zip(
                *(index.column(c).to_pylist() for c in ("key", "root", "label")), strict=True)}
        return self._label_of

    def _sidecar(self, url: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(keys, features [n, sum(dims)] with zeros where absent, mask [n, modalities])."""
        info = self.spec.info
        fs, path = filesystem(url.removesuffix(".tar") + ".emb.parquet", info.storage_options)
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
        present = {}
        for modality, dim in info.dims.items():
            if modality in table.column_names:
                column = table.column(modality).combine_chunks()
                rows = column.is_valid().to_numpy(zero_copy_only=False)
                values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
                present[modality] = (rows, values if len(values) == rows.sum() else values[rows])
        return table.column("key").to_pylist(), *pack_vectors(table.num_rows, info.dims, present)

    def _images(self, url: str, keys: set[str]) -> dict[str, bytes]:
        info = self.spec.info

        def select(member: str) -> bool:
            key, _, ext = member.partition(".")
            return key in keys and ext in ("jpg", "png", "webp")

        return {s["__key__"]: next(s[e] for e in ("jpg", "png", "webp") if e in s)
                for s in iter_shard(url, info.storage_options, select)}

    def _samples(self, consumer: int, epoch: int) -> Iterator[dict]:
        """This consumer's samples of the split, dealt round-robin over the epoch's shard order."""
        spec, info = self.spec, self.spec.info
        order = list(info.shard_urls)
        np.random.default_rng([spec.seed, epoch]).shuffle(order)
        label_of = self._labels()
        folder = {root: i for i, root in enumerate(info.roots)}
        position = 0
        for url in order:
            keys, features, mask = self._sidecar(url)
            here = folder[parent(url)]
            mine = []
            for i, key in enumerate(keys):
                if label_of.get(key, (None,))[0] != here:
                    continue
                if spec.split != "all" and split_of(key, spec.val_fraction) != spec.split:
                    continue
                if position % spec.consumers == consumer:
                    mine.append(i)
                position += 1
            images = self._images(url, {keys[i] for i in mine}) if spec.image_branch_size and mine else {}
            for i in mine:
                yield {"key": keys[i], "label": label_of[keys[i]][1], "features": features[i], "mask": mask[i],
                       "image": images.get(keys[i])}

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
                 "labels": torch.tensor([r["label"] for r in rows]),
                 "weights": torch.tensor(weights, dtype=torch.float32)}
        if self.spec.image_branch_size:
            info = self.spec.info
            batch["pixels"] = torch.from_numpy(np.stack([branch_pixels(r["image"], self.spec.image_branch_size,
                                                                       info.pixel_mean, info.pixel_std) for r in rows]))
        return batch

    def consumer_batches(self, epoch: int, k: int) -> list[tuple[list[dict], list[float]]]:
        """Every batch of this rank's consumer k in an epoch; its batch i is the rank's batch i*workers + k."""
        spec = self.spec
        consumer = spec.rank * spec.loader_workers + k
        rows = list(self._shuffled(self._samples(consumer, epoch), consumer, epoch))
        wanted = spec.batches_per_consumer * spec.batch_size
        weights = [1.0] * len(rows) + [0.0] * (wanted - len(rows))
        if len(rows) < wanted:  # padding rows: any real row (or the first of the split), weight 0
            filler = rows[-1] if rows else next(self._samples(0, epoch), None)
            rows += [filler] * (wanted - len(rows))
        size = spec.batch_size
        return [(rows[i * size : (i + 1) * size], weights[i * size : (i + 1) * size])
                for i in range(spec.batches_per_consumer)]

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        per_rank, workers = spec.batches_per_rank, spec.loader_workers
        info = get_worker_info()
        me, processes = (info.id, info.num_workers) if info else (0, 1)
        total = (self.last_epoch - self.epoch) * per_rank - self.start
        made: dict[tuple[int, int], list] = {}
        # The DataLoader takes item g from process g % processes, so process `me` yields the
        # rank's items me, me + processes, ...; with one process per consumer that is always
        # the same consumer, whatever the start.
        for g in range(me, total, processes):
            flat = self.start + g
            epoch, b = self.epoch + flat // per_rank, flat % per_rank
            k = b % workers
            if (epoch, k) not in made:
                made = {key: v for key, v in made.items() if key[0] == epoch}
                made[(epoch, k)] = self.consumer_batches(epoch, k)
            yield self._collate(*made[(epoch, k)][b // workers])


def loader(spec: StreamSpec, epoch: int, start: int = 0, last_epoch: int | None = None) -> DataLoader:
    """The rank's batches in order from (epoch, start) to the end of last_epoch - 1 (default: epoch)."""
    workers = spec.loader_workers if spec.loader_workers > 1 else 0
    return DataLoader(ShardStream(spec, epoch, start, last_epoch), batch_size=None, num_workers=workers,
                      prefetch_factor=4 if workers else None)
