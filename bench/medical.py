"""DICOM throughput: the shard stage against a plain pydicom loop on the same files, in one run.

    python bench/medical.py [--n 1200] [--workers 2]

The corpus: every DICOM test file pydicom ships that tessera turns into a sample (CT, MR, NM,
US, secondary captures; uncompressed, deflated, RLE, JPEG, JPEG-LS, JPEG 2000), cycled to --n
rows, each copy with its own preamble so that no two files are equal bytes.

(a) the shard stage (Ray tasks, `--workers` CPUs; Ray start-up and one warm-up run on a few
    shards' rows, which imports the decoders in the workers, not timed): decode, modality
    LUT, window, resize, JPEG member, pseudonyms, tar, index, dedup pass;
(b) one process doing what a user would write with pydicom: dcmread, one frame, modality LUT,
    VOI LUT, scale to 8 bits, resize, JPEG, into a tar.
Prints files/s of each and a/b (goal >= 1.5 on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shard import alternated, stage_rate, start_ray  # noqa: E402

from tessera.preprocess.config import ImageConfig, MedicalConfig, ShardConfig  # noqa: E402
from tessera.preprocess.image import resize_image  # noqa: E402
from tessera.preprocess.medical import read_medical  # noqa: E402
from tessera.preprocess.reject import Reject  # noqa: E402

SALT = "bench-salt"


def test_files(cfg: ShardConfig) -> list[Path]:
    """pydicom's test files that tessera makes a sample of (the rest are rejects: no pixels,
    burned-in text, undecodable), by name."""
    from pydicom.data import get_testdata_file

    folder = Path(get_testdata_file("CT_small.dcm")).parent
    kept = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            read_medical(path.read_bytes(), "dicom", cfg.medical, cfg.image)
        except Reject:
            continue
        kept.append(path)
    return kept


def make_corpus(folder: Path, n: int, cfg: ShardConfig) -> tuple[Path, dict[str, int]]:
    """N DICOM files cycled from pydicom's, each copy's 128-byte preamble (free for any use by the
    standard) carrying its number, so that no two files are equal bytes; their manifest and
    the count of rows by transfer syntax."""
    import pydicom

    sources = test_files(cfg)
    (folder / "dicom").mkdir(parents=True, exist_ok=True)
    rows, syntaxes = [], Counter()
    for i in range(n):
        source = sources[i % len(sources)]
        data = source.read_bytes()
        name = f"dicom/{i:06d}-{source.name}"
        (folder / name).write_bytes(f"copy {i}".encode().ljust(128, b"\0") + data[128:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            syntaxes[pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID.name] += 1
        rows.append({"key": f"dcm-{i:06d}", "image": name})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, syntaxes


def plain_picture(data: bytes, size: int) -> bytes:
    """What a user would write with pydicom alone: one frame, the LUTs pydicom applies, 8 bits."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    ds = pydicom.dcmread(io.BytesIO(data))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = pixel_array(ds, index=frames // 2 if frames > 1 else None)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 2:
        pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = ((pixels - low) / max(high - low, 1e-9) * 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 255 - scaled
    picture = Image.fromarray(scaled).convert("RGB")
    out = io.BytesIO()
    resize_image(picture, size, "crop").save(out, "JPEG", quality=90)
    return out.getvalue()


def loop_rate(manifest: Path, out: Path, cfg: ShardConfig) -> float:
    rows = [json.loads(line) for line in manifest.open()]
    t0 = time.perf_counter()
    with warnings.catch_warnings(), wds.TarWriter(str(out), encoder=False) as tar:
        warnings.simplefilter("ignore")
        for row in rows:
            data = (manifest.parent / row["image"]).read_bytes()
            tar.write({"__key__": row["key"], "jpg": plain_picture(data, cfg.image.size)})
    return len(rows) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="(b) and (a) measured alternately this many times")
    args = ap.parse_args()
    cfg = ShardConfig(medical=MedicalConfig(id_salt=SALT), image=ImageConfig())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest, syntaxes = make_corpus(tmp / "corpus", args.n, cfg)
        ray_start = start_ray(args.workers)
        # one untimed stage run on a few shards' rows: each worker imports the pixel decoders
        # (as (b)'s process has them imported by the corpus scan before it is timed)
        warm = tmp / "corpus" / "warm.jsonl"
        lines = manifest.read_text().splitlines(keepends=True)
        warm.write_text("".join(lines[:cfg.samples_per_shard * args.workers]))
        stage_rate(warm, tmp / "warm", cfg)
        a, b, ratios, summary = alternated(args.repeats, lambda i: loop_rate(manifest, tmp / f"loop-{i}.tar", cfg),
                                           lambda i: stage_rate(manifest, tmp / f"stage-{i}", cfg))
    print(f"files: {args.n} cycled from {len(test_files(cfg))} pydicom test files "
          f"({summary['accepted']} accepted, {summary['rejected']} rejected), cores: {os.cpu_count()}, "
          f"workers: {args.workers}; medians of {args.repeats} alternated runs of (b) and (a)")
    print("transfer syntaxes: " + ", ".join(f"{name} {k}" for name, k in sorted(syntaxes.items(), key=lambda x: -x[1])))
    print(f"medical images: {summary['statistics']['medical']}")
    print(f"(a) tessera shard stage : {a:7.1f} files/s  (Ray + worker start-up {ray_start:.1f} s, not included)")
    print(f"(b) plain pydicom loop  : {b:7.1f} files/s  (dcmread, one frame, LUTs, 8 bits, resize, JPEG, tar)")
    print(f"a/b = {a / b:.2f}   (goal >= 1.5; per pair {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
