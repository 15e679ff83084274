"""Features that meet, the way scheduled users combine them, once per kind of storage users have
(local disk, S3, S3 through a proxy that fails requests): refresh with curation and
`refresh_train: all` over two versions, where version 2 changes one key into a copy that
curation drops and removes another, training through forked loader processes. The trainer's
counts must be what its loaders yield, and neither the changed key nor the removed one may be
trained on (no earlier copy stands in for them)."""

import json

import pytest
import s3fs

from tessera.core.storage import Store
from tessera.train.data import DatasetInfo, StreamSpec, loader
from tessera.train.layout import SUPERSEDED
from tessera.workflows.config import load_config
from tessera.workflows.refresh import run_refresh
from tests.conftest import LABELS

CAPTIONS = [
    "a red fox crosses a snowy meadow at dawn", "three sailboats race past a white lighthouse",
    "a chef slices fresh tomatoes on a wooden board", "an old steam train climbs a mountain pass",
    "children fly kites on a windy hill in spring", "a violinist plays alone in an empty concert hall",
    "rain falls on a busy street full of umbrellas", "a hummingbird hovers beside a purple flower",
    "astronauts float inside the space station module", "a potter shapes wet clay on a spinning wheel",
    "fishermen haul nets onto a small wooden boat", "a golden retriever catches a frisbee mid air",
    "hot air balloons drift over a green valley", "a blacksmith hammers glowing iron on an anvil",
    "surfers ride a huge wave under a grey sky", "a librarian shelves books in a quiet reading room",
    "desert dunes glow orange in the setting sun", "a beekeeper lifts a frame covered in bees",
    "skaters glide across a frozen lake at night", "a mechanic repairs a motorcycle engine in a garage",
    "penguins march in a line across the ice", "a painter mixes colours on a palette by the window",
    "lightning strikes a lone tree in a dark field", "a baker pulls loaves of bread from a stone oven",
]
CHANGED, COPIED, REMOVED = "k03", "k07", "k05"  # k03 becomes a case-and-punctuation variant of k07's caption


def manifest_rows(version: int) -> list[str]:
    rows = [{"key": f"k{i:02d}", "text": text, "label": LABELS[i % len(LABELS)]} for i, text in enumerate(CAPTIONS)]
    if version == 2:
        rows[int(CHANGED[1:])]["text"] = CAPTIONS[int(COPIED[1:])].upper() + "!!"
        rows = [r for r in rows if r["key"] != REMOVED]
    return [json.dumps(r) for r in rows]


@pytest.fixture(params=["local", "s3", "flaky-s3"])
def job_out(request, tmp_path):
    """OUT and its storage options, per kind of storage."""
    if request.param == "local":
        yield str(tmp_path / "out"), {}, None
        return
    options = request.getfixturevalue("s3_options")
    bucket = f"combinations-{request.param}"
    s3fs.S3FileSystem(**options["s3"]).mkdir(bucket)
    if request.param == "s3":
        yield f"s3://{bucket}/out", options, None
        return
    proxy = request.getfixturevalue("flaky_s3")
    proxy.rate, proxy.faults, proxy.requests = 0.03, 0, 0
    try:
        yield f"s3://{bucket}/out", proxy.options, proxy
    finally:
        proxy.rate = 0.0


@pytest.mark.slow
def test_refresh_curation_and_training_over_versions_agree_on_the_live_rows(ray_session, tmp_path, job_out):
    url, options, proxy = job_out
    manifest = tmp_path / "manifest.jsonl"

    def refresh(version: int) -> dict:
        manifest.write_text("\n".join(manifest_rows(version)) + "\n")
        cfg = load_config(None, [
            f"job.manifest={json.dumps(str(manifest))}", f"job.out={json.dumps(url)}", "job.refresh_train=all",
            f"runtime.storage_options={json.dumps(options)}", "runtime.progress=false",
            f"shard.labels={json.dumps(list(LABELS))}", "shard.samples_per_shard=8",
            "embed.image=null", "embed.audio=null", "embed.video=null", "embed.cpus_per_actor=1",
            "curate.semantic.modalities=[text]", "curate.semantic.eps=0.1", "curate.semantic.clusters=1",
            "train.model.modalities=[text]", "train.epochs=1", "train.max_steps=2", "train.workers=1",
            "train.micro_batch_size=4", "train.warmup_steps=1",
            "train.loader_workers=2", "train.val_fraction=0.25"])
        return run_refresh(cfg, cfg.runtime.store(url))

    first = refresh(1)
    assert first.chain.train.train_samples + first.chain.train.val_samples == 24
    second = refresh(2)
    assert (second.changed, second.removed) == (1, 1)
    assert second.chain.curate.semantic_duplicates == {"text": 1}  # the changed key's new copy
    out = Store(url, options)
    live = 24 - 2  # less the removed key, and the changed one whose newest copy curation dropped
    trained = second.chain.train
    assert trained.train_samples + trained.val_samples == live

    # what the trainer counted is what its loaders yield: each live key once, through forked workers
    folders = [out.child("versions", v) for v in ("v000001", "v000002")]
    info = DatasetInfo.read(folders, ("text",), 0.25, superseded=out.child("versions", "v000002", "train", SUPERSEDED))
    assert (info.counts["train"], info.counts["val"]) == (trained.train_samples, trained.val_samples)
    seen = []
    for split in ("train", "val"):
        spec = StreamSpec(info, split, 0.25, 4, 4, 0, None, loader_workers=2)
        seen += [k for b in loader(spec, 0) for k, w in zip(b["keys"], b["weights"].tolist(), strict=True) if w]
    assert sorted(seen) == sorted(f"k{i:02d}" for i in range(24) if f"k{i:02d}" not in (CHANGED, REMOVED))
    if proxy is not None:  # (retried by s3fs itself, or by the store when an outage outlasts s3fs's retries)
        assert proxy.faults > 0
