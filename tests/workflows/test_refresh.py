"""Scheduled refresh: new and changed rows only, removals recorded, a no-op when nothing changed,
versions kept, exactly one refresh at a time."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tessera.core.errors import LeaseHeld
from tessera.core.lease import LEASE
from tessera.core.storage import Store
from tessera.core.versions import superseded
from tessera.preprocess.keys import safe_key
from tessera.train.data import DatasetInfo, StreamSpec, loader
from tessera.workflows.config import load_config
from tessera.workflows.dataset import open_dataset
from tessera.workflows.refresh import run_refresh, versions
from tessera.workflows.status import folder_status
from tests.conftest import LABELS, MINI, REPO, TESSERA, mini_manifest_lines


def config(manifest, out, *overrides):
    return load_config(None, [f"job.manifest={json.dumps(str(manifest))}", f"job.out={json.dumps(str(out))}",
                              "runtime.progress=false", f"shard.labels={json.dumps(list(LABELS))}",
                              "shard.samples_per_shard=8", f"shard.inputs.allow={json.dumps([str(MINI)])}",
                              "embed.video=null", "embed.audio=null", *overrides])


def refresh(manifest, out, *overrides) -> dict:
    cfg = config(manifest, out, *overrides)
    return run_refresh(cfg, cfg.runtime.store(cfg.job.out))


@pytest.mark.slow
def test_new_changed_and_removed_rows_become_versions_then_nothing(ray_session, tmp_path):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    manifest.write_text("\n".join(mini_manifest_lines(20)) + "\n{broken\n")
    first = refresh(manifest, out)
    assert first.version == "v000001" and first.new_rows == 21 and first.added == 20
    assert first.chain.shard.accepted == 20 and first.chain.shard.rejected == 1

    manifest.write_text("\n".join(mini_manifest_lines(30)) + "\n{broken\n")
    second = refresh(manifest, out)
    assert second.version == "v000002" and (second.new_rows, second.added) == (10, 10)
    assert second.chain.shard.inputs == 10 and second.chain.shard.accepted == 10
    assert second.chain.embed.samples == 10 and second.chain.embed.modalities["image"]["computed"] <= 10

    assert refresh(manifest, out).version is None
    assert (out / "versions" / "v000001" / "shard-000000.emb.parquet").exists()  # earlier versions intact
    status = folder_status(Store(str(out)))  # tessera status: the versions, the newest one's stages
    assert status["kind"] == "refresh output" and status["newest"] == "v000002" and status["lease"] is None
    assert [(v["version"], v["added"]) for v in status["versions"]] == [("v000001", 20), ("v000002", 10)]
    assert status["stages"]["shard"]["complete"] and status["stages"]["shard"]["up_to_date"]
    assert status["stages"]["embed"]["complete"] and status["last_run"]

    lines = mini_manifest_lines(30)
    changed, removed = json.loads(lines[3]), json.loads(lines[5])
    changed["text"] = "A changed caption."
    lines[3] = json.dumps(changed)
    del lines[5]  # a takedown: the row is gone from the manifest
    manifest.write_text("\n".join(lines) + "\n{broken\n")
    third = refresh(manifest, out)
    assert (third.added, third.changed, third.removed, third.new_rows) == (0, 1, 1, 1)
    assert third.chain.embed.modalities["text"]["computed"] == 1
    assert third.chain.embed.modalities["image"]["cache_hits"] == 1  # the picture did not change
    listed = versions(Store(str(out)))
    assert [(v["version"], v["added"], v["changed"], v["removed"], v["accepted"], v["rejected"]) for v in listed] == [
        ("v000001", 20, 0, 0, 20, 1), ("v000002", 10, 0, 0, 10, 0), ("v000003", 0, 1, 1, 1, 0)]

    # every version together, as training and evaluation read them: the newest copy of the
    # changed key, and no trace of the removed one
    info = DatasetInfo.read([Store(str(out / "versions" / v["version"])) for v in listed], ("text",), 0.0,
                            superseded=Store(str(tmp_path / "superseded.parquet")))
    superseded = pq.read_table(tmp_path / "superseded.parquet").to_pylist()  # read per shard by the loaders
    assert {(r["root"], r["key"]) for r in superseded} == {(0, changed["key"]), (0, removed["key"])}
    seen = [k for b in loader(StreamSpec(info, "all", 0.0, 8, 4, 0, None), 0)
            for k, w in zip(b["keys"], b["weights"].tolist(), strict=True) if w]
    assert len(seen) == len(set(seen)) == info.counts["all"] == 29 and removed["key"] not in seen
    # ... and as users open them: one row per live key, the changed one with its new caption
    rows = {r["key"]: r for r in open_dataset(str(out)).take_all()}
    assert sorted(rows) == sorted(seen) and rows[changed["key"]]["text"] == "A changed caption."

    assert refresh(manifest, out).version is None
    lines.insert(5, json.dumps(removed))  # back again: added, not remembered as seen
    manifest.write_text("\n".join(lines) + "\n{broken\n")
    back = refresh(manifest, out)
    assert (back.added, back.changed, back.removed) == (1, 0, 0)


def test_a_changed_file_is_found_by_its_metadata(ray_session, tmp_path):
    from PIL import Image

    pictures, manifest, out = tmp_path / "pictures", tmp_path / "manifest.jsonl", tmp_path / "out"
    pictures.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(pictures / f"p{i}.png")
        rows.append(json.dumps({"key": f"p{i}" if i < 3 else "p 3/odd", "image": f"pictures/p{i}.png",
                                "label": "object"}))
    manifest.write_text("\n".join(rows) + "\n")
    overrides = ("embed.text=null", "embed.image=null")
    assert refresh(manifest, out, *overrides).added == 4
    assert refresh(manifest, out, *overrides).version is None  # stats the files, reads none
    Image.new("RGB", (32, 32), (0, 0, 255)).save(pictures / "p1.png")  # same path, new picture
    os.utime(pictures / "p1.png", ns=(1, 1))
    manifest.write_text("\n".join(rows[:3]) + "\n")  # and the row whose key is not a safe one removed
    again = refresh(manifest, out, *overrides)
    assert (again.added, again.changed, again.removed) == (0, 1, 1)
    folders = [Store(str(out / "versions" / v["version"])) for v in versions(Store(str(out)))]
    assert superseded(folders) == (frozenset({"p1", safe_key("p 3/odd")}), frozenset())  # no copy of it stays live


def first_epoch_loss(out, version: str) -> float:
    records = [json.loads(line) for line in (out / "versions" / version / "train" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r.get("loss") is not None and r["epoch"] == 0]
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_refresh_trains_each_version_from_the_previous_versions_model(ray_session, tmp_path):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    training = ["job.refresh_train=all", "train.micro_batch_size=4", "train.epochs=6", "train.warmup_steps=2",
                "train.lr=0.003", "train.loader_workers=0", "train.model.modalities=[text, image]"]
    manifest.write_text("\n".join(mini_manifest_lines(24)) + "\n")
    first = refresh(manifest, out, *training)
    assert first.chain.train.init_from is None  # nothing trained before: from scratch
    lines = mini_manifest_lines(32)
    manifest.write_text("\n".join(lines) + "\n")
    second = refresh(manifest, out, *training)
    assert second.chain.shard.inputs == 8
    assert second.chain.train.init_from == str(out / "versions" / "v000001" / "train")
    assert second.chain.train.train_samples + second.chain.train.val_samples == 32  # every version
    # it continued, not restarted: its first epoch is already far below a fresh model's
    assert first_epoch_loss(out, "v000002") < 0.6 * first_epoch_loss(out, "v000001")
    assert (out / "versions" / "v000001" / "train" / "model.safetensors").exists()  # earlier model kept
    assert refresh(manifest, out, *training).version is None
    assert all(v["val_accuracy"] is not None for v in versions(Store(str(out))))


def lease_of(pid: int, renewed: float | None = None) -> str:
    """A lease record as a holder with PID on this host leaves it."""
    now = time.time() if renewed is None else renewed
    return json.dumps({"token": f"t{pid}", "fence": 7, "command": "tessera refresh", "host": socket.gethostname(),
                       "pid": pid, "acquired": now, "renewed": now, "ttl_s": 60, "released": False})


@pytest.mark.slow
def test_a_live_lease_stops_a_second_refresh_and_a_dead_ones_is_taken_over(ray_session, tmp_path):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    manifest.write_text("\n".join(mini_manifest_lines(3)) + "\n")
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LEASE).write_text(lease_of(live.pid))
        with pytest.raises(LeaseHeld, match=f"held by tessera refresh \\(pid {live.pid} on .*, fence 7\\) since"):
            refresh(manifest, out)
    finally:
        live.kill()
        live.wait()
    assert refresh(manifest, out).new_rows == 3  # its process is gone from this host: taken over at once
    lease = json.loads((out / LEASE).read_text())
    assert lease["fence"] == 8 and lease["released"]


@pytest.mark.slow
def test_a_killed_refresh_blocks_another_host_for_its_ttl_only(tmp_path):
    """SIGKILL a refresh holding OUT's lease; refreshes from another host (a hostname of their
    own, `unshare --uts`), retried every second as a scheduler would, are refused (75) until
    the lease has gone unrenewed for its TTL, then one proceeds."""
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    manifest.write_text("\n".join(mini_manifest_lines(6)) + "\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"job": {"manifest": str(manifest), "out": str(out)},
                               "runtime": {"lease": {"ttl_s": 5, "heartbeat_s": 1}, "workers": 1},
                               "shard": {"labels": list(LABELS), "inputs": {"allow": [str(MINI)]}},
                               "embed": {"image": None, "audio": None, "video": None, "cpus_per_actor": 1}}))
    command = [*TESSERA, "refresh", str(cfg), "--no-progress"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    first = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / LEASE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # a heartbeat or so
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed = time.time()
    codes = []
    while True:
        done = subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname pod-2 && exec "$@"', "-", *command],
                              cwd=REPO, env=env, capture_output=True, text=True)
        codes.append(done.returncode)
        if done.returncode != 75 or len(codes) > 30:
            break
        assert "is held by tessera refresh" in done.stderr
        time.sleep(1)
    assert codes[-1] == 0 and codes.count(75) >= 1, (codes, done.stderr[-2000:])
    lease = json.loads((out / LEASE).read_text())
    assert lease["host"] == "pod-2" and lease["fence"] == 2 and lease["released"]
    # taken over once the lease went unrenewed for its TTL (its last renewal: at most a heartbeat
    # before the kill), and soon after: the TTL and a heartbeat, then at most the attempt refused
    # just before it expired and the next (each a process start of up to 4 s, a second between)
    assert 5 - 1 <= lease["acquired"] - killed <= 5 + 1 + 4 + 1 + 4
    assert json.loads(done.stdout.splitlines()[-1])["version"] == "v000001"


def test_refresh_exit_codes(ray_session, tmp_path):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    manifest.write_text("\n".join(mini_manifest_lines(2)) + "\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"job": {"manifest": str(manifest), "out": str(out)},
                               "embed": {"audio": None, "video": None}}))
    out.mkdir()
    (out / LEASE).write_text(lease_of(os.getpid()))
    locked = subprocess.run([*TESSERA, "refresh", str(cfg), "--no-progress"], cwd=REPO,
                            capture_output=True, text=True)
    assert locked.returncode == 75 and f"is held by tessera refresh (pid {os.getpid()}" in locked.stderr


def started_together(cfg: Path, n: int) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "RAY_ADDRESS": ""}  # each its own local Ray, if it gets that far
    procs = [subprocess.Popen([*TESSERA, "refresh", str(cfg), "--no-progress"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_refreshes_started_together_make_exactly_one_version(tmp_path, store, request):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"key": f"k{i}", "text": f"caption {i}", "label": "object"}) + "\n"
                                for i in range(12)))
    job = {"job": {"manifest": str(manifest), "out": str(tmp_path / "out")}, "runtime": {"workers": 1},
           "shard": {"samples_per_shard": 4}, "embed": {"text": None, "image": None, "audio": None, "video": None}}
    if store == "s3":
        import s3fs

        options = request.getfixturevalue("s3_options")
        s3fs.S3FileSystem(**options["s3"]).mkdir("refreshes")
        job["job"]["out"], job["runtime"]["storage_options"] = "s3://refreshes/out", options
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    runs = started_together(tmp_path / "job.yaml", 6)
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 75, 75, 75, 75, 75], [r.stderr[-2000:] for r in runs]
    winner = next(r for r in runs if r.returncode == 0)
    assert json.loads(winner.stdout.splitlines()[-1])["version"] == "v000001"
    out = Store(job["job"]["out"], job["runtime"].get("storage_options", {}))
    assert [v["version"] for v in versions(out)] == ["v000001"]
    assert out.names("versions/*") == ["versions/v000001"] and out.read_json(LEASE)["released"]


def test_a_versions_new_rows_are_deduped_against_earlier_versions(ray_session, tmp_path):
    """Version 3 brings near copies (and an exact copy) of version 1's rows: dropped naming the
    version-1 row, from the stored fingerprints (version 1's inputs are not read again)."""
    from PIL import Image

    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    captions = ["a brown dog runs across the green field chasing a red ball in the park",
                "two children build a tall sandcastle on the beach while the tide comes in",
                "the old lighthouse stands on a rocky cliff above a stormy grey sea at dusk"]
    rows = [{"key": f"t{i}", "text": c} for i, c in enumerate(captions)]
    rows.append({"key": "astronaut", "image": str(MINI / "images" / "astronaut.png"), "text": "stock photo"})
    near = ["shard.near_dedup.text.threshold=0.7", "shard.near_dedup.image.max_distance=6",
            "embed.image=null", "embed.text=null"]

    def write(*extra):
        manifest.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
        return refresh(manifest, out, *near)

    assert write().chain.shard.accepted == 4
    library = {"key": "new", "text": "a quiet library reading room with long wooden tables"}
    assert write(library).chain.shard.accepted == 1
    Image.open(MINI / "images" / "astronaut.png").convert("RGB").resize((256, 256)).save(tmp_path / "copy.jpg")
    third = write({"key": "new", "text": "a quiet library reading room with long wooden tables"},
                  {"key": "t0-again", "text": captions[0].replace("red", "blue")},
                  {"key": "astronaut-copy", "image": str(tmp_path / "copy.jpg"), "text": "another caption"},
                  {"key": "t1-exact", "text": captions[1]})
    assert third.version == "v000003" and third.chain.shard.accepted == 0 and third.chain.shard.duplicates == 3
    reasons = {r["sample_key"]: r["reason"] for r in pq.read_table(
        out / "versions" / "v000003" / "rejects" / "duplicates.parquet").to_pylist()}
    assert reasons["t0-again"].startswith("near-duplicate of 't0' of version v000001 (text jaccard 0.")
    assert reasons["astronaut-copy"].startswith("near-duplicate of 'astronaut' of version v000001 (image phash")
    assert reasons["t1-exact"] == "duplicate content of 't1' of version v000001"
