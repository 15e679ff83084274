"""The encoder actor: loads its models once, then embeds the wanted members of a shard,
decoding the next payloads in a background thread while the model runs."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np

from features.cache import EmbeddingCache
from features.config import EmbedConfig
from features.encoders import build_encoders
from preprocess.storage import iter_shard

log = logging.getLogger(__name__)

MEMBER_EXT = {"text": ("txt",), "image": ("jpg", "png", "webp"), "audio": ("flac", "wav"), "video": ("frames.npy",)}
_DONE = object()


def prefetch(items: Iterable, depth: int) -> Iterator:
    """Iterate `items` in a background thread, up to `depth` ahead; errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def fill():
        try:
            for item in items:
                q.put(item)
        except BaseException as e:  # handed to the consumer, which re-raises
            q.put(e)
        q.put(_DONE)

    threading.Thread(target=fill, daemon=True).start()
    while (item := q.get()) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        yield item


class EmbedWorker:
    """Plain class (testable without Ray); `EmbedActor` is its Ray actor."""

    def __init__(self, cfg: EmbedConfig, modalities: list[str], cache_root: str, storage_options: dict,
                 device: str | None = None):
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.cfg = cfg
        self.storage_options = storage_options
        self.encoders = {m: e for m, e in build_encoders(cfg).items() if m in modalities}
        for encoder in self.encoders.values():
            encoder.load(device, cfg.precision)
        self.caches = {m: EmbeddingCache(cache_root, e.identity(), storage_options) for m, e in self.encoders.items()}
        self.model_calls = 0

    def _prepared(self, shard_url: str, wanted: dict[str, dict[str, str]]):
        """(modality, payload hash, model input) for each wanted member; bad payloads logged, skipped."""
        keys = {k for per_key in wanted.values() for k in per_key}

        def select(name: str) -> bool:
            key, _, ext = name.partition(".")
            return key in keys and any(ext in MEMBER_EXT[m] for m in wanted)

        for sample in iter_shard(shard_url, self.storage_options, select):
            key = sample["__key__"]
            for modality, per_key in wanted.items():
                digest = per_key.get(key)
                payload = next((sample[e] for e in MEMBER_EXT[modality] if e in sample), None)
                if digest is None or payload is None:
                    continue
                try:
                    yield modality, digest, self.encoders[modality].prepare(payload)
                except Exception as e:  # a corrupt member must not stop the shard
                    log.warning("%s of %s in %s cannot be prepared: %s", modality, key, shard_url, e)
                    yield modality, digest, e

    def embed_shard(self, shard_url: str, wanted: dict[str, dict[str, str]]) -> dict:
        """Embed wanted[modality][key] -> payload hash; append the vectors to the cache."""
        started = time.perf_counter()
        pending: dict[str, tuple[list, list]] = {m: ([], []) for m in wanted}
        done: dict[str, tuple[list, list]] = {m: ([], []) for m in wanted}
        errors = {m: 0 for m in wanted}
        seconds = {m: 0.0 for m in wanted}

        def flush(modality: str) -> None:
            hashes, items = pending[modality]
            if not items:
                return
            t0 = time.perf_counter()
            vectors = self.encoders[modality].embed(items)
            seconds[modality] += time.perf_counter() - t0
            self.model_calls += 1
            done[modality][0].extend(hashes)
            done[modality][1].append(vectors)
            pending[modality] = ([], [])

        for modality, digest, item in prefetch(self._prepared(shard_url, wanted), depth=2 * self.cfg.batch_size):
            if isinstance(item, Exception):
                errors[modality] += 1
                continue
            pending[modality][0].append(digest)
            pending[modality][1].append(item)
            if len(pending[modality][1]) >= self.cfg.batch_size:
                flush(modality)
        computed = {}
        for modality in wanted:
            flush(modality)
            hashes, blocks = done[modality]
            if hashes:
                vectors = np.concatenate(blocks)
                self.caches[modality].append(hashes, vectors, self.encoders[modality].dim)
            computed[modality] = len(hashes)
        return {"computed": computed, "errors": errors, "model_seconds": seconds,
                "seconds": time.perf_counter() - started}
