"""The shard stage end to end on a local Ray: dirty and mini corpora, determinism, resume, conflicts."""

import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from tessera.core.errors import OutputConflict, StageFailed
from tessera.core.storage import Store
from tessera.preprocess.config import AugmentConfig, ImageConfig, ShardConfig
from tessera.preprocess.layout import ShardSummary, committed_shards
from tessera.preprocess.modality import member_extensions
from tessera.preprocess.stage import run_shard_stage
from tessera.preprocess.video import decode_frames
from tests.conftest import DIRTY, LABELS, MINI, REPO, TESSERA, index_rows, reject_rows

SAMPLE = REPO / "workflows" / "sample_corpus" / "manifest.jsonl"


def shard(manifest, out, **cfg) -> ShardSummary:
    return run_shard_stage(str(manifest), Store(str(out)), ShardConfig(labels=LABELS, **cfg), progress=False)


def read_samples(out: Path) -> dict[str, dict]:
    """Every sample of the committed shards, decoded the way a training reader would (no pickle)."""

    def decode(sample):
        decoded = {"__key__": sample["__key__"]}
        for ext, data in sample.items():
            if ext in member_extensions()["image"]:
                decoded["image"] = np.asarray(Image.open(io.BytesIO(data)))
            elif ext == "flac":
                decoded["audio"] = sf.read(io.BytesIO(data))
            elif ext in member_extensions()["video"]:
                decoded["video"] = decode_frames(data)
            elif ext == "txt":
                decoded["text"] = data.decode()
            elif ext == "json":
                decoded["json"] = json.loads(data)
            elif ext == "cls":
                decoded["cls"] = int(data)
        return decoded

    urls = [str(out / name) for name in committed_shards(Store(str(out)))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode)
    return {s["__key__"]: s for s in dataset}


def outcomes(out: Path) -> dict[int, tuple[str, dict]]:
    """Manifest line -> ('accept', index row) or ('reject', reject line)."""
    result = {}
    for row in index_rows(out):
        assert row["line"] not in result
        result[row["line"]] = ("accept", row)
    for reject in reject_rows(out):
        assert reject["line"] not in result, f"line {reject['line']} both accepted and rejected"
        result[reject["line"]] = ("reject", reject)
    return result


# What each reject of the dirty corpus must say, by key: its code and (part of) its reason.
DIRTY_REASONS = {
    "truncated-jpeg": ("image.truncated", "image truncated"),
    "empty-image": ("input.empty", "empty file"),
    "not-an-image": ("image.unrecognised", "not an image"),
    "pixel-bomb": ("image.bomb", "decompression bomb"),
    "missing-file": ("input.not_found", "file not found"),
    "latin1-caption": ("text.not_utf8", "not valid UTF-8"),
    "one-pixel": ("image.too_small", "below the minimum side"),
    "truncated-wav": ("audio.truncated", "audio truncated"),
    "nan-audio": ("audio.not_finite", "audio contains NaN"),
    "ok": ("dedup.duplicate_key", "duplicate key (first on line 1)"),
    "ok-copy": ("dedup.duplicate_content", "duplicate content of 'ok' (first on line 1)"),
    "odd-label": ("label.wrong_type", "label has the wrong type"),
    "huge-caption": ("text.too_long", "over the maximum"),
    None: ("manifest.not_json", "not valid JSON"),
}


def test_dirty_corpus_ends_as_expected_line_by_line(ray_session, tmp_path, capsys):
    with pytest.raises(StageFailed, match=r"12 of 23 inputs rejected, duplicates aside \(52%, over "
                                          r"shard.max_reject_fraction 0.5\); "
                                          r"every shard and reject line is written .* Top codes: \d+ x "):
        shard(DIRTY / "manifest.jsonl", tmp_path)
    summary = ShardSummary.read(Store(str(tmp_path)))
    expected = [json.loads(line) for line in (DIRTY / "EXPECTED.jsonl").read_text().splitlines()]
    got = outcomes(tmp_path)
    assert sorted(got) == list(range(1, 24))  # every input in a shard or in the reject report
    samples = read_samples(tmp_path)
    for line, exp in enumerate(expected, start=1):
        outcome, record = got[line]
        rule = exp["expect"]
        if outcome == "reject":
            assert rule in ("reject", "reject-or-repair", "accept-or-dedup", "reject-or-truncate"), (line, exp)
            assert record["key"] == exp["key"]
            code, reason = DIRTY_REASONS[exp["key"]]
            assert record["code"] == code and reason in record["reason"], (exp, record)
            continue
        assert rule.startswith("accept") or rule == "reject-or-rename", (line, exp)
        sample = samples[record["key"]]
        assert sample["json"]["source_key"] == exp["key"] == record["source_key"]
        assert "/" not in record["key"] and "." not in record["key"]
    assert samples["messy-caption"]["text"] == "A rocket on the pad."
    assert "text" not in samples["empty-caption"] and samples["empty-caption"]["json"]["text"] == {"empty": True}
    assert samples["exif-rotated"]["json"]["image"]["source_size"] == [427, 640]
    gray = samples["gray16"]["image"]
    assert gray.mean() < 200 and gray.std() > 20  # a scaled ramp, not clipped to white
    assert samples["silent-audio"]["json"]["audio"]["silent"] is True
    assert summary.inputs == 23 and summary.accepted == 9 and summary.rejected == 14
    assert summary.rejected_by_code["image.bomb"] == 1 and summary.rejected_by_code["dedup.duplicate_key"] == 1
    assert sum(summary.rejected_by_code.values()) == summary.rejected
    # tessera rejects: one JSON line per reject, each with its code from the closed set
    from tessera.preprocess.reject import CODES
    from tessera.workflows.cli import main

    capsys.readouterr()
    assert main(["rejects", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == summary.rejected and all(line["code"] in CODES for line in lines)


def test_mini_corpus_every_modality_decodes(ray_session, tmp_path):
    summary = shard(MINI / "manifest.jsonl", tmp_path, samples_per_shard=16)
    assert (summary.inputs, summary.accepted, summary.rejected, summary.shards) == (43, 43, 0, 3)
    index = {row["key"]: row for row in index_rows(tmp_path)}
    samples = read_samples(tmp_path)
    assert set(samples) == set(index)
    manifest = {json.loads(line)["key"]: json.loads(line) for line in (MINI / "manifest.jsonl").open()}
    for key, sample in samples.items():
        row = index[key]
        assert set(row["modalities"]) == {m for m in ("image", "text", "audio", "video") if m in manifest[key]}
        assert row["image_sha256"] is None or len(row["image_sha256"]) == 64
        assert LABELS[sample["cls"]] == row["label"] == manifest[key]["label"]
        if "image" in row["modalities"]:
            assert sample["image"].shape == (224, 224, 3)
        if "audio" in row["modalities"]:
            audio, rate = sample["audio"]
            assert rate == 16000 and audio.ndim == 1 and len(audio) > 1600
        if "video" in row["modalities"]:
            assert sample["video"].shape == (8, 112, 112, 3)
        assert sample["text"] == manifest[key]["text"]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            modality = {"jpeg": "image", "txt": "text", "flac": "audio", "mp4": "video"}.get(ext)
            if modality:
                payload = tar.extractfile(member).read()
                assert hashlib.sha256(payload).hexdigest() == index[key][f"{modality}_payload_sha256"]
    stats = summary.statistics
    assert len(stats["image"]["mean"]) == 3 and all(0 < s < 0.5 for s in stats["image"]["std"])
    assert stats["audio"]["clips"] == 41 and stats["text"]["texts"] == 43


AUGMENTED = {"image": ImageConfig(size=96, augment=AugmentConfig(random_resized_crop=True, hflip=True,
                                                                 rotate_degrees=5, brightness=0.2))}


def output_bytes(out: Path) -> dict[str, bytes]:
    """The tars, the index and the reject parts."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.suffix == ".tar" or p.parent.name in ("index", "rejects")}


def test_same_inputs_config_and_seed_give_identical_bytes(ray_session, tmp_path):
    shard(SAMPLE, tmp_path / "a", samples_per_shard=5, **AUGMENTED)
    shard(SAMPLE, tmp_path / "b", samples_per_shard=5, **AUGMENTED)
    a, b = output_bytes(tmp_path / "a"), output_bytes(tmp_path / "b")
    assert sum(name.endswith(".tar") for name in a) == 4 and a == b
    shard(SAMPLE, tmp_path / "c", samples_per_shard=5, seed=1, **AUGMENTED)
    assert output_bytes(tmp_path / "c")["shard-000000.tar"] != a["shard-000000.tar"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_output(ray_session, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({"runtime": {"workers": 1}, "shard": {
        "samples_per_shard": 1, "labels": list(LABELS), "image": AUGMENTED["image"].model_dump(mode="json")}}))
    killed = tmp_path / "killed"
    cmd = [*TESSERA, "shard", str(SAMPLE), str(killed), "--config", str(config),
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # (a bound, not a timing: a loaded machine starts Ray slowly)
    while len(list(killed.glob("shard-*.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed_before = len(list(killed.glob("shard-*.json"))) - 1  # minus shard-config.json
    assert 2 <= committed_before < 17 and not (killed / "summary.json").exists()

    summary = run_shard_stage(str(SAMPLE), Store(str(killed)), ShardConfig(
        samples_per_shard=1, labels=LABELS, **AUGMENTED), progress=False)
    assert summary.resumed_shards >= committed_before and not summary.up_to_date
    shard(SAMPLE, tmp_path / "whole", samples_per_shard=1, **AUGMENTED)
    assert output_bytes(killed) == output_bytes(tmp_path / "whole")
    assert not list(killed.glob("*.tmp-*"))


def test_a_different_config_never_mixes_into_an_existing_output(ray_session, tmp_path):
    shard(SAMPLE, tmp_path, samples_per_shard=8)
    with pytest.raises(OutputConflict, match="fields changed: image.size"):
        shard(SAMPLE, tmp_path, samples_per_shard=8, image=ImageConfig(size=64))


def test_other_inputs_never_mix_into_an_existing_output(ray_session, tmp_path):
    shard(SAMPLE, tmp_path / "out", samples_per_shard=8)
    fewer = tmp_path / "manifest.jsonl"
    lines = SAMPLE.read_text().splitlines()[1:]
    fewer.write_text("\n".join(line.replace('"images/', f'"{SAMPLE.parent}/images/')
                               .replace('"audio/', f'"{SAMPLE.parent}/audio/')
                               .replace('"video/', f'"{SAMPLE.parent}/video/') for line in lines))
    with pytest.raises(OutputConflict, match="holds shards of other inputs than this manifest "
                                             r"\(files added, removed or changed: manifest.jsonl\)"):
        shard(fewer, tmp_path / "out", samples_per_shard=8)


def test_only_committed_shards_are_listed(ray_session, tmp_path):
    shard(SAMPLE, tmp_path, samples_per_shard=8)
    out = Store(str(tmp_path))
    assert committed_shards(out) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    (tmp_path / "shard-000003.tar.tmp-x").write_bytes(b"partial")
    (tmp_path / "shard-000002.json").unlink()  # as if killed between the rename and the marker
    assert committed_shards(out) == ["shard-000000.tar", "shard-000001.tar"]


def test_hostile_manifest_lines_are_reject_lines_among_good_ones(ray_session, tmp_path):
    """A line nested 100,000 deep, an integer of 5,000 digits, a lone surrogate in a key, NaN
    and a 20 MB field in the metadata, among the mini rows: the stage completes, each hostile
    line is a reject of its own line, every sample's json is strict JSON."""
    from tests.preprocess.test_manifest import HOSTILE

    good = [json.loads(line) for line in (MINI / "manifest.jsonl").open()][:6]
    for row in good:
        for field in ("image", "audio", "video"):
            row.pop(field, None)
    good[0]["score"], good[1]["blob"] = float("nan"), "z" * (20 << 20)
    lines = [json.dumps(good[0]), HOSTILE["deep"], json.dumps(good[1]), HOSTILE["digits"],
             HOSTILE["surrogate key"], *map(json.dumps, good[2:])]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    summary = shard(tmp_path / "m.jsonl", tmp_path / "out")
    assert (summary.inputs, summary.accepted, summary.rejected) == (9, 5, 4)
    reasons = {r["line"]: r["reason"] for r in reject_rows(tmp_path / "out")}
    assert reasons[2] == "manifest line is nested too deeply" and "5000 digits" in reasons[4]
    assert reasons[3].startswith("metadata is 20971") and "lone UTF-16 surrogate" in reasons[5]
    samples = read_samples(tmp_path / "out")
    assert samples[good[0]["key"]]["json"]["metadata"] == {"score": None}
    for sample in samples.values():  # strict JSON for any reader: no NaN, no Infinity
        json.loads(json.dumps(sample["json"]), parse_constant=lambda name: pytest.fail(f"{name} in a sample's json"))
