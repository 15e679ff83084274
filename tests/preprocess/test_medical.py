"""DICOM and NIfTI in the image field: pixels (modality LUT, windowing, MONOCHROME1, colour,
compressed transfer syntaxes), de-identification by allow-list, and no identifier anywhere in
a shard output. Real files: pydicom's and nibabel's own test data (in their wheels)."""

import io
import json
import tarfile
from pathlib import Path

import nibabel
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, pixel_array

from tessera.core.storage import Store
from tessera.preprocess.config import ImageConfig, MedicalConfig, ShardConfig
from tessera.preprocess.image import process_image
from tessera.preprocess.medical import kind_of, pseudonym, read_medical, slice_positions, window
from tessera.preprocess.reject import Reject
from tessera.train.data import split_of
from tests.conftest import TESSERA, index_rows, reject_rows

SALT = "a-salt-nobody-knows"
MEDICAL = MedicalConfig(id_salt=SALT)
NIFTI = Path(nibabel.__file__).parent / "tests" / "data"
# what CT_small.dcm says of who and where: none of it may reach an output
CT_IDENTIFIERS = ("CompressedSamples", "1CT1", "JFK IMAGING CENTER", "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",
                  "20040119")


def dicom(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def read(data: bytes, cfg: MedicalConfig = MEDICAL, **image):
    """The one picture of DATA (shard.medical.slices: middle)."""
    (got,) = read_medical(data, kind_of(data), cfg, ImageConfig(**image))
    return got


def saved(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_files_are_known_by_their_bytes_not_their_names():
    assert kind_of(dicom("CT_small.dcm")) == "dicom"
    assert kind_of((NIFTI / "anatomical.nii").read_bytes()) == "nifti1"
    assert kind_of((NIFTI / "example_nifti2.nii.gz").read_bytes()) == "nifti2"  # gzipped, header inflated
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(png, "PNG")
    assert kind_of(png.getvalue()) is None and kind_of(b"") is None and kind_of(b"\x1f\x8bnot gzip") is None
    # without shard.medical (never, in the shard stage) a DICOM is not an image Pillow knows
    with pytest.raises(Reject) as rejected:
        process_image(dicom("CT_small.dcm"), ImageConfig(), np.random.default_rng(0))
    assert rejected.value.code == "image.unrecognised"


def test_keep_raw_stores_the_values_before_windowing_losslessly():
    """CT_small's raw member: pydicom's modality LUT output (Hounsfield units), as int16."""
    from tessera.preprocess.image import MODALITY

    data = dicom("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    hu = apply_modality_lut(pixel_array(ds), ds)
    (kept,) = MODALITY.process(None, {"image": data}, ShardConfig(medical={"id_salt": SALT, "keep_raw": True}),
                            np.random.default_rng(0))
    raw = np.load(io.BytesIO(kept.extra["medical.npy"]), allow_pickle=False)
    assert raw.dtype == np.int16 and np.array_equal(raw, hu)
    (plain,) = MODALITY.process(None, {"image": data}, ShardConfig(medical={"id_salt": SALT}), np.random.default_rng(0))
    assert plain.extra == {} and plain.data == kept.data


def test_ct_values_go_through_the_modality_lut_to_hounsfield_units_then_the_window():
    data = dicom("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    stored = pixel_array(ds).astype(float)
    hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # by hand
    for setting, (center, width) in (("lung", (-600.0, 1500.0)), ((40.0, 400.0), (40.0, 400.0))):
        got = read(data, MedicalConfig(id_salt=SALT, window=setting))
        by_hand = np.round(np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(np.asarray(got.picture), by_hand)
        assert (got.meta["window_center"], got.meta["window_width"]) == (center, width)
    # no window in the file: the 0.5-99.5th percentiles of its HU
    auto = read(data)
    assert auto.meta["window"] == "auto" and auto.meta["window_width"] == pytest.approx(
        np.percentile(hu, 99.5) - np.percentile(hu, 0.5), rel=1e-3)


def test_the_files_window_is_used_and_monochrome1_is_inverted():
    data = dicom("MR_small.dcm")
    normal = read(data)
    assert normal.meta["window"] == "file" and normal.meta["window_center"] == 600.0
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = read(saved(ds))
    diff = np.asarray(inverted.picture).astype(int) + np.asarray(normal.picture).astype(int) - 255
    assert np.abs(diff).max() <= 1  # (rounding)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"])
def test_every_lossless_transfer_syntax_gives_the_same_picture(name):
    assert np.array_equal(np.asarray(read(dicom(name)).picture), np.asarray(read(dicom("MR_small.dcm")).picture))


def test_colour_photometrics_become_rgb():
    rgb, ybr = read(dicom("SC_rgb_rle.dcm")), read(dicom("SC_ybr_full_422_uncompressed.dcm"))
    a, b = np.asarray(rgb.picture).astype(float), np.asarray(ybr.picture).astype(float)
    assert a.shape == b.shape == (100, 100, 3) and np.abs(a - b).mean() < 3  # one picture stored two ways
    palette = np.asarray(read(dicom("examples_palette.dcm")).picture)
    assert palette.shape[2] == 3 and not np.array_equal(palette[..., 0], palette[..., 1])
    sixteen = np.asarray(read(dicom("SC_rgb_rle_16bit.dcm")).picture)
    assert np.array_equal(sixteen, np.asarray(read(dicom("SC_rgb_rle.dcm")).picture))  # scaled to 8 bits


def test_a_multiframe_file_gives_its_middle_frame_decoded_alone():
    got = read(dicom("SC_rgb_rle_2frame.dcm"))
    assert (got.meta["frames"], got.meta["frame"]) == (2, 1)


def test_only_the_allow_list_is_kept_and_identifiers_become_keyed_hashes():
    got = read(dicom("CT_small.dcm"))
    assert got.meta["Modality"] == "CT" and got.meta["PixelSpacing"] == [0.661468, 0.661468]
    assert got.meta["patient"] == pseudonym("1CT1", SALT) != pseudonym("1CT1", "another salt")
    assert got.meta["study"] == pseudonym("1.3.6.1.4.1.5962.1.2.1.20040119072730.12322", SALT)
    text = json.dumps(got.meta)
    assert not any(value in text for value in CT_IDENTIFIERS)
    wider = read(dicom("CT_small.dcm"), MedicalConfig(id_salt=SALT, keep=("Modality", "InstitutionName")))
    assert wider.meta["InstitutionName"] == "JFK IMAGING CENTER"  # what the user's own list names


def test_burned_in_text_no_salt_no_pixels_and_broken_files_are_rejects_that_quote_no_value():
    ds = pydicom.dcmread(io.BytesIO(dicom("CT_small.dcm")))
    ds.BurnedInAnnotation = "YES"
    burned = saved(ds)
    cases = [(burned, MEDICAL, "medical.burned_in"), (dicom("CT_small.dcm"), MedicalConfig(), "medical.no_salt"),
             (dicom("rtplan.dcm"), MEDICAL, "medical.no_pixels"), (dicom("badVR.dcm"), MEDICAL, "medical.undecodable"),
             (dicom("MR_truncated.dcm"), MEDICAL, "medical.undecodable")]
    for data, cfg, code in cases:
        with pytest.raises(Reject) as rejected:
            read(data, cfg)
        assert rejected.value.code == code and rejected.value.modality == "image"
        assert not any(value in rejected.value.reason for value in CT_IDENTIFIERS)
    assert read(burned, MedicalConfig(id_salt=SALT, allow_burned_in=True)).meta["Modality"] == "CT"


def test_reading_says_nothing_in_warnings_or_logs(caplog, recwarn):
    """pydicom warns and logs as it reads a file out of the standard (these: "The PN component
    length (78) exceeds ..."; others quote the value): nothing of it comes out of tessera."""
    import logging
    import warnings

    from pydicom import config

    ds = pydicom.dcmread(io.BytesIO(dicom("CT_small.dcm")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mode, config.settings.writing_validation_mode = config.settings.writing_validation_mode, config.IGNORE
        try:
            ds.PatientName, ds.InstitutionName = "Doe^Jane" + "x" * 70, "General Hospital " + "y" * 70
            data = saved(ds)
        finally:
            config.settings.writing_validation_mode = mode
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # (what setting the values logged: the test's own doing)
    warnings.simplefilter("always")
    got = read(data, MedicalConfig(id_salt=SALT, keep=("Modality", "PatientName", "InstitutionName")))
    assert str(got.meta["PatientName"]).startswith("Doe^Jane")  # kept: the list named it
    assert [str(w.message) for w in recwarn] == [] and [r.getMessage() for r in caplog.records] == []


def test_nifti_is_read_in_canonical_orientation_one_slice_and_bounded():
    data = (NIFTI / "example4d.nii.gz").read_bytes()
    got = read(data)
    volume = nibabel.as_closest_canonical(nibabel.load(NIFTI / "example4d.nii.gz"))
    middle = np.rot90(np.asarray(volume.dataobj[:, :, volume.shape[2] // 2, 0], dtype=float))
    center, width = got.meta["window_center"], got.meta["window_width"]
    by_hand = np.round(window(middle, center, width) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(got.picture), by_hand)
    assert got.meta["spacing"] == [2.0, 2.0, 2.2] and got.meta["shape"] == [128, 96, 24, 2]
    with pytest.raises(Reject) as rejected:
        read(data, MedicalConfig(max_volume_bytes=10_000))
    assert rejected.value.code == "medical.too_large"


def test_config_keeps_the_salt_out_of_every_dump_and_refuses_unknown_attributes():
    cfg = ShardConfig(medical={"id_salt": SALT})
    assert SALT not in json.dumps(cfg.model_dump(mode="json"))
    assert cfg.digest() != ShardConfig(medical={"id_salt": "another"}).digest()
    with pytest.raises(ValueError, match="not DICOM keywords"):
        MedicalConfig(keep=("Modality", "PatientNmae"))


def _every_byte(out: Path) -> str:
    """Every file under OUT as text: Parquet tables as their rows, tar members, the rest raw."""
    text = ""
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            text += json.dumps(pq.read_table(path).to_pylist(), default=str)
        elif path.suffix == ".tar":
            with tarfile.open(path) as tar:
                text += "".join(tar.extractfile(m).read().decode("latin-1") for m in tar.getmembers())
        else:
            text += path.read_bytes().decode("latin-1")
    return text


@pytest.mark.slow
def test_no_identifier_reaches_any_byte_of_the_output_and_every_test_file_ends_somewhere(tmp_path):
    """`tessera shard` over every DICOM file pydicom ships (decodable or not) and three made to
    carry identifiers (two studies of one patient, one with burned-in text): each ends in a shard
    or a reject with its code (no crash); no identifying value and not the salt is in any byte of
    OUT — tars, index, rejects, summaries, markers, logs; the patient's two studies share one
    side of the split and one fold."""
    import subprocess


    files = {Path(p).stem.replace("+", "_"): Path(p).read_bytes()
             for p in sorted(Path(get_testdata_file("CT_small.dcm")).parent.glob("*.dcm"))}
    ct = pydicom.dcmread(io.BytesIO(dicom("CT_small.dcm")))
    identifiers = {"ReferringPhysicianName": "Dr^Who^Referring", "AccessionNumber": "ACC-9911-77",
                   "PatientBirthDate": "19451231", "PerformingPhysicianName": "Dr^House^Performing",
                   "InstitutionAddress": "1 Hospital Road, Springfield"}
    for keyword, value in identifiers.items():
        setattr(ct, keyword, value)
    ct.private_block(0x0011, "ACME 1.1", create=True).add_new(0x01, "LO", "Private-Jane-Roe")
    files["ct-1"] = saved(ct)
    ct.StudyInstanceUID, ct.SOPInstanceUID = "1.2.3.4", "1.2.3.4.5"
    files["ct-2"] = saved(ct)  # the same patient, another study
    ct.BurnedInAnnotation = "YES"
    files["burned"] = saved(ct)
    for key, data in files.items():
        (tmp_path / f"{key}.dcm").write_bytes(data)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"key": k, "image": f"{k}.dcm"}) + "\n" for k in files))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"shard": {"medical": {"id_salt": SALT, "keep_raw": True},
                                            "max_reject_fraction": None}}))
    out = tmp_path / "job" / "shards"  # (a job's OUT holds its shards here: the run report reads them)
    done = subprocess.run([*TESSERA, "shard", str(manifest), str(out), "--config", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    rejects = reject_rows(out)
    assert summary["accepted"] + summary["rejected"] == len(files) == len(index_rows(out)) + len(rejects)
    assert {r["code"] for r in rejects} <= {"medical.undecodable", "medical.no_pixels", "medical.burned_in",
                                           "image.unrecognised", "image.too_small", "dedup.duplicate_content"}
    assert summary["accepted"] >= 50 and ("burned", "medical.burned_in") in {(r["key"], r["code"]) for r in rejects}
    counted = summary["statistics"]["medical"]  # by modality and body part, as status shows them
    written = summary["accepted"] + sum(r["code"].startswith("dedup.") for r in rejects)  # (counted as written)
    assert sum(counted.values()) == written and counted["CT"] >= 3
    from tessera.workflows.status import folder_status

    assert f"medical images: CT {counted['CT']}" in folder_status(Store(str(out)))["stages"]["shard"]["detail"]
    from tessera.workflows.report import write_report

    write_report(Store(str(out.parent)))
    assert "<figcaption>Medical images</figcaption>" in (out.parent / "report.html").read_text()
    everything = _every_byte(out.parent) + done.stdout + done.stderr  # the report.html included
    assert (out / "logs").is_dir()
    secrets = (*CT_IDENTIFIERS, *identifiers.values(), "Private-Jane-Roe", SALT, "1.2.3.4.5")
    assert [value for value in secrets if value in everything] == []
    group = {r["key"]: r["split_group"] for r in index_rows(out)}
    assert group["ct-1"] == group["ct-2"] == pseudonym("1CT1", SALT)
    for fold in range(5):  # the two studies share the split and every cross-validation fold
        window = (fold / 5, (fold + 1) / 5)
        assert split_of("ct-1", window, group["ct-1"]) == split_of("ct-2", window, group["ct-2"])
    samples, raw = {}, {}
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, _, ext = m.name.partition(".")
                if ext == "json":
                    samples[key] = json.loads(t.extractfile(m).read())
                elif ext == "medical.npy":
                    raw[key] = np.load(io.BytesIO(t.extractfile(m).read()), allow_pickle=False)
    assert samples["ct-1"]["image"]["medical"]["study"] != samples["ct-2"]["image"]["medical"]["study"]
    assert set(raw) == set(samples) and raw["ct-1"].dtype == np.int16  # keep_raw: a member beside each picture


def test_slices_middle_all_or_n_evenly_spaced():
    assert slice_positions(15, "middle") == [7] and slice_positions(1, "all") == [0]
    assert slice_positions(15, "all") == list(range(15)) and slice_positions(3, 8) == [0, 1, 2]
    assert slice_positions(15, 4) == [1, 5, 9, 13] and slice_positions(24, 1) == [12]  # the middles of 4 runs
    with pytest.raises(ValueError, match="medical.slices"):
        MedicalConfig(slices=0)


def test_every_frame_of_a_multiframe_file_is_a_slice_with_its_own_values():
    data = dicom("rtdose.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    got = read_medical(data, "dicom", MedicalConfig(id_salt=SALT, slices="all"), ImageConfig())
    assert [g.part for g in got] == [f"slice-{i:03d}" for i in range(15)]
    assert [g.meta["frame"] for g in got] == list(range(15)) and {g.meta["frames"] for g in got} == {15}
    for frame, image in enumerate(got):
        assert np.array_equal(image.values, apply_modality_lut(pixel_array(ds, index=frame), ds))
    assert len({g.meta["patient"] for g in got}) == 1  # one patient's series
    (middle,) = read_medical(data, "dicom", MEDICAL, ImageConfig())  # the default: one sample, the row's key
    assert middle.part is None and middle.meta["frame"] == 7 and np.array_equal(middle.values, got[7].values)
    volume = nibabel.as_closest_canonical(nibabel.load(NIFTI / "example4d.nii.gz"))
    slices = read_medical((NIFTI / "example4d.nii.gz").read_bytes(), "nifti1", MedicalConfig(slices=4), ImageConfig())
    assert [s.meta["slice"] for s in slices] == [3, 9, 15, 21] and slices[0].part == "slice-003"
    assert np.array_equal(slices[1].values, np.rot90(np.asarray(volume.dataobj[:, :, 9, 0], dtype=float)))
    (flat,) = read_medical(dicom("CT_small.dcm"), "dicom", MedicalConfig(id_salt=SALT, slices="all"), ImageConfig())
    assert flat.part is None  # a 2-D image keeps its row's key


def test_slices_are_samples_deduplicated_within_and_across_series(ray_session, tmp_path):
    """`slices: 4` over a 15-frame dose grid (two of its kept frames made identical), a 30-frame
    ultrasound, a NIfTI volume and a 2-D CT; the dose file again under its key on a later line:
    each slice a sample keyed KEY/slice-NNN; the identical frame is a duplicate of its twin in the
    same series; the repeated row loses all its slices; one patient's slices share a split group."""
    from tessera.preprocess.stage import run_shard_stage

    ds = pydicom.dcmread(io.BytesIO(dicom("rtdose.dcm")))
    frame = len(ds.PixelData) // 15
    pixels = bytearray(ds.PixelData)
    pixels[9 * frame:10 * frame] = pixels[5 * frame:6 * frame]
    ds.PixelData = bytes(pixels)
    (tmp_path / "dose.dcm").write_bytes(saved(ds))
    (tmp_path / "us.dcm").write_bytes(dicom("examples_ybr_color.dcm"))
    (tmp_path / "ct.dcm").write_bytes(dicom("CT_small.dcm"))
    (tmp_path / "brain.nii.gz").write_bytes((NIFTI / "example4d.nii.gz").read_bytes())
    rows = [{"key": "dose", "image": "dose.dcm"}, {"key": "us", "image": "us.dcm"}, {"key": "ct", "image": "ct.dcm"},
            {"key": "brain", "image": "brain.nii.gz"}, {"key": "dose", "image": "dose.dcm"}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ShardConfig(samples_per_shard=2, medical={"id_salt": SALT, "slices": 4}, near_dedup={"image": {}})
    summary = run_shard_stage(str(tmp_path / "manifest.jsonl"), Store(str(tmp_path / "out")), cfg, progress=False)
    kept = {r["key"]: r for r in index_rows(tmp_path / "out")}
    assert sorted(kept) == ["brain/slice-003", "brain/slice-009", "brain/slice-015", "brain/slice-021", "ct",
                            "dose/slice-001", "dose/slice-005", "dose/slice-013",
                            "us/slice-003", "us/slice-011", "us/slice-018", "us/slice-026"]
    drops = {(r["line"], r["sample_key"]): (r["code"], r["reason"]) for r in reject_rows(tmp_path / "out")}
    assert drops[(1, "dose/slice-009")] == ("dedup.duplicate_content",
                                           "duplicate content of 'dose' slice-005 (first on line 1)")
    assert {k for (line, k) in drops if line == 5} == {f"dose/slice-{i:03d}" for i in (1, 5, 9, 13)}
    assert {c for (line, _), (c, _) in drops.items() if line == 5} == {"dedup.duplicate_key"}
    assert (summary.inputs, summary.accepted, summary.rejected, summary.duplicates) == (5, 12, 5, 5)
    assert {kept[f"dose/slice-{i:03d}"]["split_group"] for i in (1, 5, 13)} == {pseudonym("id11111", SALT)}
    assert all(r["source_key"] == r["key"].split("/")[0] and r["line"] in (1, 2, 3, 4) for r in kept.values())
    assert len({r["content_id"] for r in kept.values()}) == 12
    samples = {}
    for tar in sorted((tmp_path / "out").glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            samples.update({m.name.rsplit(".", 1)[0]: json.loads(t.extractfile(m).read())
                            for m in t if m.name.endswith(".json")})
    assert samples["us/slice-011"]["part"] == "slice-011" and samples["us/slice-011"]["image"]["medical"]["frame"] == 11
    assert "part" not in samples["ct"]


def test_duplicate_slices_of_a_series_keep_its_earliest(ray_session, tmp_path):
    """Every frame of a 30-frame ultrasound cine as a sample, near dedup on: frames repeated
    exactly or barely changed are dropped naming an earlier frame of the series."""
    from tessera.preprocess.stage import run_shard_stage

    (tmp_path / "us.dcm").write_bytes(dicom("examples_ybr_color.dcm"))
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"key": "us", "image": "us.dcm"}) + "\n")
    cfg = ShardConfig(medical={"id_salt": SALT, "slices": "all"}, near_dedup={"image": {"max_distance": 4}})
    summary = run_shard_stage(str(tmp_path / "manifest.jsonl"), Store(str(tmp_path / "out")), cfg, progress=False)
    kept = {r["key"] for r in index_rows(tmp_path / "out")}
    drops = reject_rows(tmp_path / "out")
    assert summary.inputs == 1 and summary.accepted == len(kept) and len(kept) + len(drops) == 30
    assert {d["code"] for d in drops} == {"dedup.duplicate_content", "dedup.near_duplicate"}
    for drop in drops:
        first = drop["reason"].split("'us' ", 1)[1][:len("slice-000")]
        assert drop["reason"].startswith(("duplicate content of 'us' slice-", "near-duplicate of 'us' slice-"))
        assert f"us/{first}" < drop["sample_key"]
        # (a near-duplicate component keeps its earliest; an exact twin may itself be near-dropped)
        assert f"us/{first}" in kept or drop["code"] == "dedup.duplicate_content"
