"""Training input: committed shards streamed with their embedding sidecars, split by rank and
loader worker so that an epoch sees every sample of its split exactly once.

Within an epoch, shards come in a seeded order and samples are dealt round-robin to the
(rank x loader worker) consumers, each of which shuffles through a seeded buffer and batches.
Every consumer yields the same number of full batches: the few slots past the end of the
split are padding rows with weight 0 (no loss, no gradient, not counted as seen). A data
position is (epoch, batches consumed by the rank); resuming skips exactly those batches."""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from preprocess.stage import committed_shards
from preprocess.storage import filesystem, iter_shard, join, read_json


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a stable share of keys by hash, so the split never moves between runs."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    return "val" if bucket < val_fraction else "train"


@dataclass(frozen=True)
class DatasetInfo:
    """What a worker needs to know about SHARDS, read once on the driver."""

    shards: str
    shard_names: tuple[str, ...]
    labels: tuple[str, ...]
    dims: dict[str, int]  # modality -> embedding width, in input order
    counts: dict[str, int]  # split -> labelled samples
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    storage_options: dict

    @classmethod
    def read(cls, shards: str, modalities: tuple[str, ...], val_fraction: float,
             storage_options: dict | None = None) -> DatasetInfo:
        storage_options = storage_options or {}
        fs, root = filesystem(shards, storage_options)
        names = committed_shards(shards, storage_options)
        index = [r for r in pq.read_table(io.BytesIO(fs.cat_file(join(root, "index.parquet")))).to_pylist()
                 if r["shard"] in set(names) and r["label"] is not None]
        labels = read_json(fs, join(root, "shard-config.json"))["config"]["labels"]
        labels = tuple(labels) if labels else tuple(sorted({r["label"] for r in index}))
        embed = read_json(fs, join(root, "embed-summary.json"))
        dims = {m: embed["dims"][m] for m in modalities if m in embed["dims"]}
        if not dims:
            raise ValueError(f"{shards} has no embeddings for any of {list(modalities)}: run `tessera embed` first")
        stats = read_json(fs, join(root, "summary.json"))["statistics"]["image"]
        counts = {s: sum(1 for r in index if split_of(r["key"], val_fraction) == s) for s in ("train", "val")}
        return cls(shards, tuple(names), labels, dims, counts, tuple(stats["mean"] or (0.5,) * 3),
                   tuple(stats["std"] or (0.25,) * 3), storage_options)


@dataclass(frozen=True)
class StreamSpec:
    info: DatasetInfo
    split: str
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
    """Batches of one rank for one epoch, from batch `start` on (a resumed position)."""

    def __init__(self, spec: StreamSpec, epoch: int, start: int = 0):
        self.spec, self.epoch, self.start = spec, epoch, start

    def _samples(self, consumer: int) -> Iterator[dict]:
        spec, info = self.spec, self.spec.info
        order = list(info.shard_names)
        np.random.default_rng([spec.seed, self.epoch]).shuffle(order)
        position = 0
        wanted = {"json"} | ({"jpg", "png", "webp"} if spec.image_branch_size else set())

        def select(member: str) -> bool:
            return member.partition(".")[2] in wanted

        for name in order:
            fs, root = filesystem(info.shards, info.storage_options)
            sidecar_path = join(root, name.removesuffix(".tar") + ".emb.parquet")
            sidecar = {r["key"]: r for r in pq.read_table(io.BytesIO(fs.cat_file(sidecar_path))).to_pylist()}
            for sample in iter_shard(join(info.shards, name), info.storage_options, select):
                meta = json.loads(sample["json"])
                key = sample["__key__"]
                if meta.get("label") is None or split_of(key, spec.val_fraction) != spec.split:
                    continue
                mine = position % spec.consumers == consumer
                position += 1
                if mine:
                    yield {"key": key, "label": info.labels.index(str(meta["label"])),
                           "vectors": sidecar.get(key, {}),
                           "image": next((sample[e] for e in ("jpg", "png", "webp") if e in sample), None)}

    def _shuffled(self, samples: Iterator[dict], consumer: int) -> Iterator[dict]:
        rng = np.random.default_rng([self.spec.seed, self.epoch, consumer, 1])
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.spec.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _collate(self, rows: list[dict], weights: list[float]) -> dict:
        info, spec = self.spec.info, self.spec
        features = np.zeros((len(rows), sum(info.dims.values())), np.float32)
        mask = np.zeros((len(rows), len(info.dims)), np.float32)
        for i, row in enumerate(rows):
            offset = 0
            for j, (modality, dim) in enumerate(info.dims.items()):
                vector = row["vectors"].get(modality)
                if vector is not None:
                    features[i, offset : offset + dim] = vector
                    mask[i, j] = 1.0
                offset += dim
        batch = {"keys": [r["key"] for r in rows], "features": torch.from_numpy(features),
                 "mask": torch.from_numpy(mask), "labels": torch.tensor([r["label"] for r in rows]),
                 "weights": torch.tensor(weights, dtype=torch.float32)}
        if spec.image_branch_size:
            batch["pixels"] = torch.from_numpy(np.stack([self._pixels(r["image"]) for r in rows]))
        return batch

    def _pixels(self, data: bytes | None) -> np.ndarray:
        from PIL import Image

        size, info = self.spec.image_branch_size, self.spec.info
        if data is None:
            return np.zeros((3, size, size), np.float32)
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR))
        x = (rgb.astype(np.float32) / 255.0 - np.float32(info.pixel_mean)) / np.float32(info.pixel_std)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def consumer_batches(self, k: int, first: int) -> Iterator[dict]:
        """Batches `first`.. of this rank's consumer k; its batch i is the rank's batch i*workers + k."""
        spec = self.spec
        consumer = spec.rank * spec.loader_workers + k
        rows = list(self._shuffled(self._samples(consumer), consumer))
        wanted = spec.batches_per_consumer * spec.batch_size
        weights = [1.0] * len(rows) + [0.0] * (wanted - len(rows))
        if len(rows) < wanted:  # padding rows: any real row (or the first of the split), weight 0
            filler = rows[-1] if rows else next(self._samples(0), None)
            rows += [filler] * (wanted - len(rows))
        for i in range(first, spec.batches_per_consumer):
            chunk = slice(i * spec.batch_size, (i + 1) * spec.batch_size)
            yield self._collate(rows[chunk], weights[chunk])

    def _first(self, k: int) -> int:
        return max(0, -(-(self.start - k) // self.spec.loader_workers))

    def __iter__(self) -> Iterator[dict]:
        workers = self.spec.loader_workers
        info = get_worker_info()
        if info is None:  # no DataLoader processes: interleave the rank's consumers here
            streams = [self.consumer_batches(k, self._first(k)) for k in range(workers)]
            for b in range(self.start, self.spec.batches_per_rank):
                yield next(streams[b % workers])
            return
        # DataLoader asks its workers in turn from worker 0: worker w serves the consumer
        # whose next batch is start + w, so batches arrive in rank order after a resume too
        k = (info.id + self.start) % workers
        yield from self.consumer_batches(k, self._first(k))


def loader(spec: StreamSpec, epoch: int, start: int = 0) -> DataLoader:
    """The rank's batches in order; DataLoader round-robins its workers, matching the deal."""
    workers = spec.loader_workers if spec.loader_workers > 1 else 0
    return DataLoader(ShardStream(spec, epoch, start), batch_size=None, num_workers=workers,
                      persistent_workers=False, prefetch_factor=4 if workers else None)
