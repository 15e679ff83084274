"""The encoder actor: embeds the payloads a shard owns that are not cached yet, decoding the
next ones in a background thread while the model runs, and writes the shard's sidecar from
those vectors plus the cached ones fetched by key. Models load on first use, so a shard whose
vectors are all cached costs lookups only."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from tessera.core.lease import Fence
from tessera.core.storage import Store
from tessera.features.cache import EmbeddingCache
from tessera.features.config import EmbedConfig
from tessera.features.encoders import build_encoders
from tessera.features.layout import sidecar_name
from tessera.features.sidecar import ShardRows, owned_by, write_sidecar
from tessera.preprocess.layout import iter_shard, member_payload
from tessera.preprocess.modality import member_extensions

log = logging.getLogger(__name__)

_DONE = object()
INSERT_ROWS = 4096  # computed vectors added to the cache in one commit
INDEX_LAG_ROWS = 65536  # cached rows allowed outside the key index before it is refreshed


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


@dataclass(frozen=True)
class EmbedShardResult:
    """What embedding one shard did (per modality: vectors computed, errors, model seconds)."""

    shard: str
    computed: dict[str, int]
    errors: dict[str, int]
    error_reasons: dict[str, int]  # "<modality>: <error>" -> vectors it cost
    model_seconds: dict[str, float]
    deferred: bool  # another shard still owes one of its vectors: its sidecar is written at the end
    missing: dict[str, int]  # vectors left missing from the sidecar written (its batch failed)
    corrupt: list[str]  # cache fragments found corrupt (dropped, their rows recomputed)
    seconds: float


class EmbedWorker:
    """Plain class (testable without Ray); `EmbedActor` in stage.py is its Ray actor."""

    def __init__(self, cfg: EmbedConfig, identities: dict[str, str], cache_root: Store, shards: Store, fence: Fence,
                 device: str | None = None):
        self.cfg = cfg
        self.shards = shards
        self.fence = fence  # the embedding run's lease on SHARDS, checked before each sidecar
        self.identities = identities
        self.encoders = {m: e for m, e in build_encoders(cfg).items() if m in identities}
        self.caches = {m: EmbeddingCache(cache_root, identities[m]) for m in identities}
        self.device = device
        self.loaded: set[str] = set()
        self.unsaved: dict[str, dict[str, np.ndarray]] = {m: {} for m in identities}
        self.model_calls = 0

    def _load(self, modality: str):
        """The modality's encoder, its model loaded on first use (once per actor)."""
        import torch

        encoder = self.encoders[modality]
        if modality not in self.loaded:
            if self.device is None:
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            if self.device == "cpu":
                torch.set_num_threads(max(1, int(self.cfg.cpus_per_actor)))
            encoder.load(self.device, self.cfg.precision)
            self.loaded.add(modality)
        return encoder

    def _prepared(self, shard: str, wanted: dict[str, dict[str, str]]):
        """(modality, payload hash, model input) for each wanted member; bad payloads logged, skipped."""
        keys = {k for per_key in wanted.values() for k in per_key}
        exts = {e for m in wanted for e in member_extensions()[m]}

        def select(name: str) -> bool:
            key, _, ext = name.partition(".")
            return key in keys and ext in exts

        for sample in iter_shard(self.shards, shard, select):
            key = sample["__key__"]
            for modality, per_key in wanted.items():
                digest = per_key.get(key)
                payload = member_payload(sample, modality)
                if digest is None or payload is None:
                    continue
                try:
                    yield modality, digest, self.encoders[modality].prepare(payload)
                except Exception as e:  # a corrupt member must not stop the shard
                    log.warning("%s of %s in %s cannot be prepared: %s", modality, key, shard, e)
                    yield modality, digest, e

    def compute(self, shard: str, wanted: dict[str, dict[str, str]]) -> tuple[dict, dict, dict, Counter]:
        """Embed wanted[modality][key] -> payload hash and add the vectors to the cache:
        (vectors by modality and hash, errors, model seconds, the errors' reasons). A member
        that cannot be prepared, or a batch whose model call fails, leaves its vectors missing
        (the sidecar says so; the next run tries them again)."""
        pending: dict[str, tuple[list, list]] = {m: ([], []) for m in wanted}
        vectors: dict[str, dict[str, np.ndarray]] = {m: {} for m in wanted}
        errors = {m: 0 for m in wanted}
        seconds = {m: 0.0 for m in wanted}
        reasons: Counter = Counter()

        def flush(modality: str) -> None:
            hashes, items = pending[modality]
            if not items:
                return
            pending[modality] = ([], [])
            encoder = self._load(modality)
            t0 = time.perf_counter()
            try:
                batch = encoder.embed(items)
            except Exception as e:  # a failed batch must not stop the shard, nor count as done
                log.warning("%s batch of %d in %s failed: %s", modality, len(items), shard, e)
                errors[modality] += len(items)
                reasons[f"{modality}: {type(e).__name__}: {str(e)[:200]}"] += len(items)
                return
            seconds[modality] += time.perf_counter() - t0
            self.model_calls += 1
            vectors[modality].update(zip(hashes, batch, strict=True))

        for modality, digest, item in prefetch(self._prepared(shard, wanted), depth=2 * self.cfg.batch_size):
            if isinstance(item, Exception):
                errors[modality] += 1
                reasons[f"{modality}: cannot be prepared: {type(item).__name__}: {str(item)[:200]}"] += 1
                continue
            pending[modality][0].append(digest)
            pending[modality][1].append(item)
            if len(pending[modality][1]) >= self.cfg.batch_size:
                flush(modality)
        for modality in wanted:
            flush(modality)
            self.unsaved[modality].update(vectors[modality])
            if len(self.unsaved[modality]) >= INSERT_ROWS:
                self._save(modality)
        return vectors, errors, seconds, reasons

    def _known(self, modality: str, hashes: set[str], refresh: bool = False) -> dict[str, np.ndarray]:
        """Vectors of these hashes this actor holds unsaved, or the cache has."""
        held = {h: self.unsaved[modality][h] for h in hashes if h in self.unsaved[modality]}
        return held | self.caches[modality].lookup(hashes - held.keys(), refresh=refresh)

    def _save(self, modality: str) -> None:
        """Add the computed vectors to the cache: one commit for many shards' worth."""
        vectors, self.unsaved[modality] = self.unsaved[modality], {}
        if vectors:
            self.caches[modality].insert(list(vectors), list(vectors.values()))
            self.caches[modality].keep_indexed(INDEX_LAG_ROWS)

    def flush(self) -> int:
        """Add what is still held to the cache (the stage calls it once the actor is done)."""
        held = sum(len(v) for v in self.unsaved.values())
        for modality in self.unsaved:
            self._save(modality)
        return held

    def embed_shard(self, shard: str, plan: str, digest: str) -> EmbedShardResult:
        """Compute the payloads SHARD owns in the PLAN (the first shard holding each payload)
        that are not cached, then write its sidecar; `deferred` when another shard still owes
        one of its vectors (the stage writes that sidecar at the end)."""
        started = time.perf_counter()
        rows = ShardRows.read(self.shards, shard, list(self.identities))
        owned = owned_by(self.shards, plan, shard)
        have = {m: self._known(m, rows.hashes(m)) for m in self.identities}
        wanted = {m: {key: h for h, key in owned.get(m, {}).items() if h not in have[m]} for m in self.identities}
        wanted = {m: w for m, w in wanted.items() if w}
        computed, errors, seconds, reasons = self.compute(shard, wanted) if wanted else ({}, {}, {}, Counter())
        for modality, vectors in computed.items():
            have[modality].update(vectors)
        failed = {m: set(wanted[m].values()) - set(computed.get(m, {})) for m in wanted}
        for modality in self.identities:  # vectors other shards owed, computed meanwhile
            rest = rows.hashes(modality) - have[modality].keys() - failed.get(modality, set())
            if rest:
                have[modality].update(self._known(modality, rest, refresh=True))
        waiting = any(rows.hashes(m) - have[m].keys() - failed.get(m, set()) for m in self.identities)
        corrupt = [c for cache in self.caches.values() for c in cache.corrupt]
        for cache in self.caches.values():
            cache.corrupt.clear()
        missing = {}
        if not waiting:
            dims = {m: self.encoders[m].dim for m in self.identities}
            self.fence.check(sidecar_name(shard))
            missing = write_sidecar(self.shards, shard, rows, have, dims, self.identities, digest, self.cfg)
        return EmbedShardResult(shard, {m: len(v) for m, v in computed.items()}, errors, dict(reasons), seconds,
                                waiting, missing, corrupt, time.perf_counter() - started)
