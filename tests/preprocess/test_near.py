"""Near-duplicate dedup: near copies of the mini images and of captions are dropped naming their
original, distinct samples stay, the same rows are kept whatever the workers and shards."""

import io
import json
import os
import random
import subprocess

import pytest
from PIL import Image, ImageEnhance

from tessera.core.storage import Store
from tessera.preprocess.config import NearTextConfig, ShardConfig
from tessera.preprocess.near import block_masks, lsh_bands, text_minhashes
from tessera.preprocess.stage import run_shard_stage
from tests.conftest import MINI, REPO, TESSERA, index_rows, reject_rows

NEAR = {"image": {"max_distance": 6}, "text": {"threshold": 0.7}}


def test_every_pair_within_the_distance_shares_a_block_combination():
    rng = random.Random(0)
    for distance, hashes in [(d, n) for d in (0, 2, 4, 6, 9) for n in (100, 10**6, 10**9)]:
        masks = block_masks(distance, hashes)
        for _ in range(100):
            h = rng.getrandbits(64)
            g = h
            for bit in rng.sample(range(64), rng.randint(0, distance)):
                g ^= 1 << bit
            signed = [x - (1 << 64) if x >= 1 << 63 else x for x in (h, g)]
            assert any(signed[0] & m == signed[1] & m for m in masks), (distance, h, g)


def test_one_changed_word_in_a_short_caption_stays_above_the_default_threshold():
    cfg = NearTextConfig(threshold=0.7)
    assert lsh_bands(0.7, 128, None) == (20, 6)  # datasketch's optimum, weighted to recall
    caption = "a brown dog runs across the green field chasing a red ball in the park"
    near = [caption.replace("red", "blue"), caption + " - stock photo", caption.upper()]
    far = ["an old man reads a newspaper on a bench beside the river at dawn"]
    signatures = text_minhashes([caption, *near, *far], cfg)
    jaccard = [sum(a == b for a, b in zip(signatures[0], s, strict=True)) / cfg.num_perm for s in signatures[1:]]
    assert all(j >= 0.7 for j in jaccard[:3]) and jaccard[3] < 0.3, jaccard


def _copies(img: Image.Image) -> dict[str, Image.Image]:
    """Near copies of IMG: re-encoded, rescaled, cropped by 3 % of its area, tone shifted."""
    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    side = 0.0076  # per side: (1 - 2 x 0.0076)^2 = 97 % of the area kept
    return {"jpeg": Image.open(io.BytesIO(buf.getvalue())),
            "half": img.resize((w // 2, h // 2), Image.LANCZOS),
            "crop": img.crop((round(w * side), round(h * side), w - round(w * side), h - round(h * side))),
            "tone": ImageEnhance.Brightness(img).enhance(1.1)}


def write_corpus(folder) -> tuple[dict, dict]:
    """Every mini image with the same boilerplate caption, near copies of the photographs
    after them, and text-only captions with their near copies. Returns {copy key: original}
    for images and texts."""
    folder.mkdir()
    labels = {json.loads(line)["key"]: json.loads(line)["label"] for line in (MINI / "manifest.jsonl").open()}
    rows, image_copies, text_copies = [], {}, {}
    originals = sorted(p for p in (MINI / "images").iterdir() if p.suffix != ".txt")
    for path in originals:
        rows.append({"key": path.stem, "image": f"../{MINI.name}/images/{path.name}", "text": "stock photo"})
    for path in originals:
        img = Image.open(path).convert("RGB")
        # copies of the photographs: the synthetic textures (brick, chessboards) move many pHash
        # bits under a 3 % crop, and the 25-pixel faces have too few pixels to rescale
        if labels.get(path.stem) == "texture" or min(img.size) < 64:
            continue
        for kind, copy in _copies(img).items():
            name = f"{path.stem}-{kind}.png"
            copy.save(folder / name)
            rows.append({"key": f"{path.stem}-{kind}", "image": name, "text": f"copy {kind} of {path.stem}"})
            image_copies[f"{path.stem}-{kind}"] = path.stem
    captions = ["a brown dog runs across the green field chasing a red ball in the park",
                "two children build a tall sandcastle on the beach while the tide comes in slowly",
                "the old lighthouse stands on a rocky cliff above a stormy grey sea at dusk"]
    for i, caption in enumerate(captions):
        rows.append({"key": f"t{i}", "text": caption})
    for i, caption in enumerate(captions):
        words = caption.split()
        words[len(words) // 2] = "purple"
        rows.append({"key": f"t{i}-word", "text": " ".join(words)})
        rows.append({"key": f"t{i}-tail", "text": caption + " , free download"})
        text_copies.update({f"t{i}-word": f"t{i}", f"t{i}-tail": f"t{i}"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return image_copies, text_copies


@pytest.mark.slow
def test_near_copies_are_dropped_naming_their_original_with_one_or_two_workers(ray_session, tmp_path):
    root = tmp_path / "corpus"
    image_copies, text_copies = write_corpus(root)
    # the inputs lie beside the manifest's folder: allowed explicitly
    shard = {"near_dedup": NEAR, "inputs": {"allow": [str(MINI)]}, "max_reject_fraction": None}
    (tmp_path / "near.yaml").write_text(json.dumps({"shard": {**shard, "samples_per_shard": 7}}))
    os.symlink(MINI, tmp_path / MINI.name)
    done = subprocess.run([*TESSERA, "shard", str(root / "manifest.jsonl"),
                           str(tmp_path / "one"), "--config", str(tmp_path / "near.yaml"), "--workers", "1",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    run_shard_stage(str(root / "manifest.jsonl"), Store(str(tmp_path / "two")),
                    ShardConfig(**shard, samples_per_shard=5), progress=False)
    kept = {r["key"] for r in index_rows(tmp_path / "one")}
    assert kept == {r["key"] for r in index_rows(tmp_path / "two")}
    rejects = {r["sample_key"]: r["reason"] for r in reject_rows(tmp_path / "one")}
    assert rejects == {r["sample_key"]: r["reason"] for r in reject_rows(tmp_path / "two")}

    # what the mini corpus holds itself: one board in grey and in colour (pHash reads luminance)
    # and a stereo pair, whose copies join the one component, kept as its earliest row
    earliest = {"chessboard-rgb": "chessboard-gray", "motorcycle-right": "motorcycle-left"}
    for copy, original in image_copies.items():
        reason = rejects.pop(copy)
        first = earliest.get(original, original)
        assert reason.startswith(f"near-duplicate of '{first}' (image phash distance "), reason
        assert int(reason.rsplit(" ", 1)[1].rstrip(")")) <= 6
    for copy, original in text_copies.items():
        assert rejects.pop(copy).startswith(f"near-duplicate of '{original}' (text jaccard 0.")
    # every other distinct image stays, whatever its boilerplate caption
    assert rejects == {"chessboard-rgb": "near-duplicate of 'chessboard-gray' (image phash distance 0)",
                       "motorcycle-right": "near-duplicate of 'motorcycle-left' (image phash distance 4)"}
    originals = {p.stem for p in (MINI / "images").iterdir() if p.suffix != ".txt"}
    assert originals - kept == {"chessboard-rgb", "motorcycle-right"}
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["rejected_by_code"]["dedup.near_duplicate"] == len(image_copies) + 2 + len(text_copies)
    assert summary["duplicates"] == len(image_copies) + 2 + len(text_copies)


def test_quality_filters_name_the_value_and_the_bound(tmp_path):
    from tessera.preprocess.manifest import ManifestRow
    from tessera.preprocess.sample import sample_or_reject

    cfg = ShardConfig(image={"max_aspect_ratio": 1.5}, text={"min_words": 3, "max_words": 6},
                      audio={"min_seconds": 60}, video={"min_seconds": 30})
    page = (MINI / "images" / "page.png").read_bytes()  # 384 x 191
    cases = [({"image": page}, {}, "image",
              "image 384x191 has aspect ratio 2.01, over shard.image.max_aspect_ratio 1.5"),
             ({}, {"text": "too short"}, "text", "text has 2 words, under shard.text.min_words 3"),
             ({}, {"text": "one two three four five six seven"}, "text",
              "text has 7 words, over shard.text.max_words 6"),
             ({"audio": (MINI / "audio" / "brick.wav").read_bytes()}, {}, "audio",
              "under shard.audio.min_seconds 60.0"),
             ({"video": (MINI / "video" / "astronaut.mp4").read_bytes()}, {}, "video",
              "under shard.video.min_seconds 30.0")]
    for line, (raw, fields, modality, reason) in enumerate(cases, 1):
        row = ManifestRow(line=line, source_key=f"k{line}", key=f"k{line}", label=None, text=fields.get("text"),
                          files={m: f"/x.{m}" for m in raw}, file="m.jsonl")
        got = sample_or_reject(row, raw, cfg)
        assert got.modality == modality and got.reason.endswith(reason), got
    # the defaults keep every one of them
    assert ShardConfig().image.max_aspect_ratio is None and ShardConfig().text.min_words is None
