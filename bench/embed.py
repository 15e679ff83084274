"""Embedding-stage throughput against the bare forward passes of the same models, and the cache.

    python bench/embed.py [--n 2000] [--batch-size 32] [--image-arch base|tiny] [--audio-arch base|tiny]

Shards N samples from make_large.py, then measures in one run:
(a) the embedding stage (Ray actor(s), decoding overlapped with compute) on a cold cache:
    embeddings/s = vectors computed / stage wall time (actor start and model load included);
(b) the model calls alone: per modality the faster of the bare forward of the same models at
    the same batch size (in a Ray task with the actor's CPUs, inputs decoded beforehand, only
    the model calls timed) and the stage's own model calls, so the baseline is never slower
    per batch than what the stage did;
(c) the same stage again on the warm cache (zero model calls): wall time.
Prints a/b (target >= 0.7) and first/cached wall time (target >= 50x).
Image and audio weights are random (no hub here); `base` uses the real architectures
(CLIP ViT-B/32 vision tower, wav2vec2-base), so the compute is that of the real models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shard import LABELS, ensure_corpus  # noqa: E402

from tessera.core.storage import Store  # noqa: E402
from tessera.features.config import AudioEncoderConfig, EmbedConfig, ImageEncoderConfig  # noqa: E402
from tessera.features.encoders import build_encoders  # noqa: E402
from tessera.features.stage import run_embed_stage  # noqa: E402
from tessera.preprocess.config import ShardConfig  # noqa: E402
from tessera.preprocess.layout import committed_shards, iter_shard  # noqa: E402
from tessera.preprocess.stage import run_shard_stage  # noqa: E402

ARCH = {
    "image": {"base": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "projection_dim": 512},
              "tiny": {}},
    "audio": {"base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072},
              "tiny": {}},
}
MEMBER = {"text": "txt", "image": "jpeg", "audio": "flac"}


def raw_forward_rate(shards: Path, cfg: EmbedConfig) -> tuple[float, dict]:
    """Model calls only, at the stage's batch size, on pre-decoded inputs: the same distinct
    payloads the stage computes. Run in a Ray task with the actor's CPUs, so that the baseline
    has the process settings the stage's actors have (Ray sets their thread counts)."""
    import hashlib

    import torch

    torch.set_num_threads(int(cfg.cpus_per_actor))
    encoders = build_encoders(cfg)
    inputs: dict[str, dict[str, object]] = {m: {} for m in MEMBER}
    for name in committed_shards(Store(str(shards))):
        for sample in iter_shard(Store(str(shards)), name):
            for modality, ext in MEMBER.items():
                if ext in sample:
                    digest = hashlib.sha256(sample[ext]).hexdigest()
                    if digest not in inputs[modality]:
                        inputs[modality][digest] = encoders[modality].prepare(sample[ext])
    total, seconds, per = 0, 0.0, {}
    for modality, by_digest in inputs.items():
        items = list(by_digest.values())
        encoders[modality].load()
        encoders[modality].embed(items[: cfg.batch_size])  # warm-up (the actor's first batch warms it too)
        t0 = time.perf_counter()
        for i in range(0, len(items), cfg.batch_size):
            encoders[modality].embed(items[i : i + cfg.batch_size])
        dt = time.perf_counter() - t0
        per[modality] = len(items) / dt
        total, seconds = total + len(items), seconds + dt
    return total / seconds, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-arch", choices=["base", "tiny"], default="base")
    ap.add_argument("--audio-arch", choices=["base", "tiny"], default="tiny")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-corpus")
    args = ap.parse_args()
    import ray

    manifest, _ = ensure_corpus(args.data, args.n)
    cfg = EmbedConfig(batch_size=args.batch_size, video=None,
                      image=ImageEncoderConfig(architecture=ARCH["image"][args.image_arch]),
                      audio=AudioEncoderConfig(architecture=ARCH["audio"][args.audio_arch]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        run_shard_stage(str(manifest), Store(str(shards)), ShardConfig(labels=LABELS), progress=False)
        t0 = time.perf_counter()
        first = run_embed_stage(Store(str(shards)), cfg, progress=False).to_json()
        first_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = run_embed_stage(Store(str(shards)), cfg, progress=False).to_json()
        cached_wall = time.perf_counter() - t0
        raw, raw_per = ray.get(ray.remote(num_cpus=cfg.cpus_per_actor)(raw_forward_rate).remote(shards, cfg))
        ray.shutdown()
    stage = first["computed"] / first_wall
    # the baseline must be no slower per batch than the stage's own model calls: per modality,
    # the faster of the bare forward and the stage's calls
    stage_calls = {m: v["computed"] / max(v["model_seconds"], 1e-9) for m, v in first["modalities"].items()}
    best = {m: max(raw_per[m], stage_calls[m]) for m in raw_per}
    computed = {m: first["modalities"][m]["computed"] for m in raw_per}
    baseline = sum(computed.values()) / sum(computed[m] / best[m] for m in raw_per if computed[m])
    print(f"samples: {first['samples']}, batch size: {args.batch_size}, image: {args.image_arch} CLIP vision, "
          f"audio: {args.audio_arch} wav2vec2, text: all-MiniLM-L6-v2, CPU actor with 2 threads")
    for modality, m in first["modalities"].items():
        print(f"  {modality:5s}: {m['computed']:5d} computed of {m['samples']} samples; "
              f"in the stage's model calls {stage_calls[modality]:7.1f}/s; bare forward {raw_per[modality]:7.1f}/s")
    print(f"(a) stage, cold cache : {stage:7.1f} embeddings/s  ({first['computed']} in {first_wall:.1f} s; "
          f"actors {first['compute_seconds']:.1f} s of it)")
    print(f"(b) model calls alone : {baseline:7.1f} embeddings/s  (per modality the faster of the bare forward, "
          f"same models, batch size and CPUs in a Ray task, and the stage's own calls); bare forward alone "
          f"{raw:.1f}/s")
    print(f"(c) stage, warm cache : {cached_wall:7.2f} s wall, {cached['computed']} computed")
    print(f"a/b = {stage / baseline:.2f}   (target >= 0.7)")
    print(f"first/cached wall = {first_wall / cached_wall:.0f}x   (target >= 50x)")


if __name__ == "__main__":
    main()
