"""The shards as the ecosystem's readers open them (Ray Data and webdataset with their default
settings, Hugging Face datasets), and `open_dataset`: the committed samples with their
embeddings and labels, duplicates left out (removed rows: tests/workflows/test_refresh.py)."""

import io
import json

import numpy as np
import soundfile as sf
import webdataset as wds
from PIL import Image

from tessera.core.storage import Store
from tessera.preprocess.config import ShardConfig
from tessera.preprocess.stage import run_shard_stage
from tessera.preprocess.video import decode_frames
from tessera.workflows.dataset import open_dataset, shard_folders
from tests.conftest import DIRTY, LABELS, MINI, index_rows

MANIFEST = {row["key"]: row for row in map(json.loads, (MINI / "manifest.jsonl").open())}


def tars(folder) -> list[str]:
    return sorted(str(p) for p in folder.glob("shard-*.tar"))


def check_sample(key: str, text: str, image: Image.Image | None, audio: bytes | None, video: bytes | None) -> None:
    source = MANIFEST[key]
    assert text == source["text"]
    assert (image is not None) == ("image" in source) and (image is None or image.size == (224, 224))
    assert (audio is not None) == ("audio" in source) and (audio is None or sf.info(io.BytesIO(audio)).samplerate
                                                           == 16000)
    assert (video is not None) == ("video" in source)
    if video is not None:
        assert decode_frames(video).shape == (8, 112, 112, 3)


def test_ray_data_reads_every_sample_with_default_settings(embedded_mini):
    import ray

    def member(row: dict, ext: str) -> bytes | None:  # (Ray Data gives NaN where a sample lacks a member)
        value = row.get(ext)
        return value if isinstance(value, bytes) else None

    rows = ray.data.read_webdataset(tars(embedded_mini)).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(MANIFEST)
    for row in rows:
        image = member(row, "jpeg")
        check_sample(row["__key__"], row["txt"], None if image is None else Image.open(io.BytesIO(image)),
                     member(row, "flac"), member(row, "mp4"))
        assert row["cls"] == LABELS.index(MANIFEST[row["__key__"]]["label"]) and row["json"]["modalities"]


def test_webdataset_decodes_every_sample(embedded_mini):
    samples = list(wds.WebDataset(tars(embedded_mini), shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(MANIFEST)
    for s in samples:
        check_sample(s["__key__"], s["txt"], s.get("jpeg"), s.get("flac"), s.get("mp4"))


def test_hugging_face_datasets_reads_every_sample(embedded_mini, monkeypatch, tmp_path):
    """Images and text decoded; audio and video as bytes (no torchcodec here). The features are
    given: HF infers them from the first 5 samples and refuses shards whose samples differ in
    their members (some samples have no audio or video)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import datasets
    from datasets import Features, Value

    features = Features({"__key__": Value("string"), "__url__": Value("string"), "jpeg": datasets.Image(),
                         "txt": Value("string"), "flac": Value("binary"), "mp4": Value("binary"),
                         "cls": Value("int64"), "json": Value("string")})
    rows = datasets.load_dataset("webdataset", data_files={"train": tars(embedded_mini)}, split="train",
                                 features=features, cache_dir=str(tmp_path / "hf"))
    assert sorted(rows["__key__"]) == sorted(MANIFEST)
    for row in rows:
        check_sample(row["__key__"], row["txt"], row["jpeg"], row["flac"], row["mp4"])


def test_open_dataset_joins_samples_embeddings_and_labels(embedded_mini):
    rows = open_dataset(str(embedded_mini)).take_all()
    assert sorted(r["key"] for r in rows) == sorted(MANIFEST)
    for row in rows:
        image = row["image"]
        check_sample(row["key"], row["text"], None if image is None else Image.open(io.BytesIO(image)),
                     row["audio"], row["video"])
        assert row["label"] == MANIFEST[row["key"]]["label"]
        assert np.asarray(row["text_embedding"], np.float32).shape == (384,)
        assert (row["image_embedding"] is None) == ("image" not in MANIFEST[row["key"]])


def test_open_dataset_leaves_duplicates_out(ray_session, tmp_path):
    out = tmp_path / "job"
    summary = run_shard_stage(str(DIRTY / "manifest.jsonl"), Store(str(out / "shards")),
                              ShardConfig(max_reject_fraction=None), progress=False)
    assert [f.url for f in shard_folders(Store(str(out)))] == [str(out / "shards")]  # a job OUT: its shards/
    keys = sorted(r["key"] for r in open_dataset(str(out)).take_all())
    assert summary.duplicates and keys == sorted(r["key"] for r in index_rows(out / "shards"))
    assert len(keys) == summary.accepted
