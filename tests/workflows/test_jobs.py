"""`tessera run`: the whole chain on the bundled sample; a second run finds every stage up to date."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tessera.core.storage import Store
from tessera.workflows.config import load_config
from tessera.workflows.jobs import bundled_manifest, run_pipeline

pytestmark = pytest.mark.slow  # (see README: the test tiers)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # .ci/run installs Debian's chromium


def test_run_chains_the_stages_and_skips_what_is_up_to_date(ray_session, tmp_path):
    cfg = load_config(None, [
        f"job.manifest={json.dumps(bundled_manifest())}", f"job.out={json.dumps(str(tmp_path))}",
        "runtime.progress=false", "shard.samples_per_shard=6", "shard.labels=[person,animal,object,science,"
        "texture,document,scene]", "train.max_steps=4", "train.micro_batch_size=4", "train.val_fraction=0.3",
        "curate.semantic.modalities=[text]", "curate.outliers.modalities=[image]",
        "shard.near_dedup.image.max_distance=6",  # moon-silent shows moon's picture again
    ])
    first = run_pipeline(cfg, Store(str(tmp_path)))
    assert [s["up_to_date"] for s in first["stages"].values()] == [False, False, False, False]
    assert list(first["stages"]) == ["shard", "embed", "curate", "train"]
    assert first["stages"]["curate"]["clusters"] == {"text": 1, "image": 1}  # 17 vectors: one cluster (auto)
    assert first["stages"]["shard"]["accepted"] == 16 and first["stages"]["train"]["steps"] == 4
    assert (tmp_path / "shards" / "shard-000000.emb.parquet").exists()
    model = first["stages"]["train"]["model"]
    assert model.startswith(str(tmp_path / "train")) and model.endswith("model.safetensors")

    second = run_pipeline(cfg, Store(str(tmp_path)))
    assert [s["up_to_date"] for s in second["stages"].values()] == [True, True, True, True]
    assert second["stages"]["embed"]["computed"] == 0
    assert json.loads((tmp_path / "run-summary.json").read_text())["stages"]["train"]["up_to_date"]

    # the run report, rendered by a real browser: every plot decoded and laid out
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom",
                          (tmp_path / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    widths = [int(w) for w in re.findall(r'data-loaded="(\d+)"', dom)]
    titles = re.findall(r"<figcaption>([^<]+)</figcaption>", dom)
    assert len(widths) == len(titles) == 12 and min(widths) > 100, (widths, titles)
    assert {"Samples per label", "Rejects by code", "Stage throughput", "Text embeddings projected to 2-D",
            "Training", "label: confusion matrix", "label: ROC curves", "label: modality ablation",
            # curation: moon and moon-silent side by side, the similarity histogram with eps drawn
            "Image near-duplicates", "text: highest within-cluster cosine"} <= set(titles)
    # ... and the data itself: a strip of samples per label (thumbnails decoded, captions, audio
    # players), each reject reason with its examples (moon-silent's picture, the near-duplicate)
    thumbs = re.findall(r'<img class="thumb" alt="([^"]+)"', dom)
    assert len(re.findall(r'<div class="strip"><h3>', dom)) == 7 and len(thumbs) >= 10
    assert "horse" in thumbs and "<audio controls" in dom
    rejects = dom[dom.index('<section id="rejects">'):]
    assert "<h3><code>dedup.near_duplicate</code>: 1 " in rejects and 'alt="moon-silent"' in rejects
    assert (tmp_path / "report.html").stat().st_size < 6_000_000
    evaluation = json.loads((Path(model).parent / "eval.json").read_text())  # each trained run is evaluated
    assert evaluation["sets"]["val"]["samples"] == first["stages"]["train"]["val_samples"]
