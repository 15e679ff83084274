"""Scheduled refresh: new rows only, a no-op when nothing changed, versions kept, one refresh at a time."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import LABELS, REPO, mini_manifest_lines
from workflows.config import load_config
from workflows.refresh import LOCK, Locked, run_refresh, versions


def config(manifest, out, *overrides):
    return load_config(None, [f"job.manifest={json.dumps(str(manifest))}", f"job.out={json.dumps(str(out))}",
                              "runtime.progress=false", f"shard.labels={json.dumps(list(LABELS))}",
                              "shard.samples_per_shard=8", "embed.video=null", "embed.audio=null", *overrides])


def test_grown_manifest_adds_only_the_new_rows_then_nothing(ray_session, tmp_path):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    manifest.write_text("\n".join(mini_manifest_lines(20)) + "\n{broken\n")
    first = run_refresh(config(manifest, out))
    assert first["version"] == "v000001" and first["new_rows"] == 21
    assert first["shard"]["accepted"] == 20 and first["shard"]["rejected"] == 1

    manifest.write_text("\n".join(mini_manifest_lines(30)) + "\n{broken\n")
    second = run_refresh(config(manifest, out))
    assert second["version"] == "v000002" and second["new_rows"] == 10
    assert second["shard"]["inputs"] == 10 and second["shard"]["accepted"] == 10
    assert second["embed"]["samples"] == 10 and second["embed"]["modalities"]["image"]["computed"] <= 10

    assert run_refresh(config(manifest, out)) == {"version": None, "new_rows": 0}
    listed = versions(str(out), {})
    assert [(v["version"], v["accepted"], v["rejected"]) for v in listed] == [("v000001", 20, 1), ("v000002", 10, 0)]
    assert (out / "versions" / "v000001" / "shard-000000.emb.parquet").exists()  # earlier versions intact

    changed = mini_manifest_lines(30)
    row = json.loads(changed[3])
    row["text"] = "A changed caption."
    changed[3] = json.dumps(row)
    manifest.write_text("\n".join(changed) + "\n{broken\n")
    third = run_refresh(config(manifest, out))
    assert third["new_rows"] == 1 and third["embed"]["modalities"]["text"]["computed"] == 1
    assert third["embed"]["modalities"]["image"]["cache_hits"] == 1  # the picture did not change


def first_epoch_loss(out, version: str) -> float:
    records = [json.loads(line) for line in (out / "versions" / version / "train" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r.get("loss") is not None and r["epoch"] == 0]
    return sum(losses) / len(losses)


def test_refresh_trains_each_version_from_the_previous_versions_model(ray_session, tmp_path):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    training = ["job.refresh_train=all", "train.micro_batch_size=4", "train.epochs=6", "train.warmup_steps=2",
                "train.lr=0.003", "train.loader_workers=0", "train.model.modalities=[text, image]"]
    manifest.write_text("\n".join(mini_manifest_lines(24)) + "\n")
    first = run_refresh(config(manifest, out, *training))
    assert first["train"]["init_from"] is None  # nothing trained before: from scratch
    manifest.write_text("\n".join(mini_manifest_lines(32)) + "\n")
    second = run_refresh(config(manifest, out, *training))
    assert second["shard"]["inputs"] == 8
    assert second["train"]["init_from"] == str(out / "versions" / "v000001" / "train")
    assert second["train"]["train_samples"] + second["train"]["val_samples"] == 32  # every version
    # it continued, not restarted: its first epoch is already far below a fresh model's
    assert first_epoch_loss(out, "v000002") < 0.6 * first_epoch_loss(out, "v000001")
    assert (out / "versions" / "v000001" / "train" / "model.safetensors").exists()  # earlier model kept
    assert all(v["val_accuracy"] is not None for v in versions(str(out), {}))
    assert run_refresh(config(manifest, out, *training)) == {"version": None, "new_rows": 0}


def test_a_live_lock_stops_a_second_refresh_and_a_stale_one_is_taken_over(ray_session, tmp_path):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    manifest.write_text("\n".join(mini_manifest_lines(3)) + "\n")
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": 0}))
        with pytest.raises(Locked, match=f"held by pid {live.pid}"):
            run_refresh(config(manifest, out))
    finally:
        live.kill()
        live.wait()
    assert run_refresh(config(manifest, out))["new_rows"] == 3  # the holder is dead: stale lock
    assert not (out / LOCK).exists()


def test_refresh_exit_codes(ray_session, tmp_path):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    manifest.write_text("\n".join(mini_manifest_lines(2)) + "\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"job": {"manifest": str(manifest), "out": str(out)},
                               "embed": {"audio": None, "video": None}}))
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0}))
    locked = subprocess.run([sys.executable, "-m", "workflows", "refresh", str(cfg), "--no-progress"], cwd=REPO,
                            capture_output=True, text=True)
    assert locked.returncode == 75 and "is held by pid" in locked.stderr
