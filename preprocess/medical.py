"""Medical images in the `image` field: DICOM (pydicom, with pylibjpeg's decoders for the
compressed transfer syntaxes) and single-file NIfTI-1/2 (nibabel), recognised by their bytes.

What comes out is what the image path takes in (an upright 8-bit RGB picture: resized,
augmented and encoded like any image) plus the sample json's `medical` entry, built from an
allow-list of attributes only. Nothing of the file that is not on the list leaves this module:
no tag value is put in a reject or a log line, and the patient and study identifiers leave it
as keyed hashes (shard.medical.id_salt) that group samples without naming anyone."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import io
import logging
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tessera.preprocess.config import WINDOW_PRESETS, ImageConfig, MedicalConfig
from tessera.preprocess.reject import Reject

DICOM_MAGIC = b"DICM"  # at byte 128, after the preamble
GZIP_MAGIC = b"\x1f\x8b"
# single-file NIfTI (.nii, .nii.gz) by its header size: where its magic is, and the magic (a
# header-and-image pair, `ni1`/`ni2` or Analyze, cannot come in one field)
NIFTI_HEADERS = {348: (344, b"n+1\x00"), 540: (4, b"n+2\x00")}
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
RAW_MEMBER = "medical.npy"  # shard.medical.keep_raw's member: the slice's values before windowing


@dataclass
class MedicalImage:
    picture: Image.Image  # 8-bit grey (L: windowed) or RGB, upright
    source_size: tuple[int, int]  # width x height of the slice
    meta: dict  # the allow-listed attributes, the pseudonymous ids, how it was windowed
    values: np.ndarray  # the slice before windowing (after the modality LUT), as the picture is oriented
    part: str | None = None  # "slice-NNN" when the slice is a sample of its own (shard.medical.slices)

    def raw_npy(self) -> bytes:
        """VALUES as .npy, losslessly: whole numbers (Hounsfield units, stored values) as the
        smallest of int16 / int32 that holds them, colour as decoded, anything else as is."""
        values = self.values
        whole = values.dtype.kind in "iu" or (values.dtype.kind == "f" and np.isfinite(values).all()
                                              and np.array_equal(values, np.round(values)))
        if whole and values.ndim == 2 and values.size:  # (colour is kept as decoded)
            low, high = values.min(), values.max()
            fits = [t for t in (np.int16, np.int32) if np.iinfo(t).min <= low and high <= np.iinfo(t).max]
            values = values.astype(fits[0]) if fits else values
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(values), allow_pickle=False)
        return buf.getvalue()


def _reject(code: str, reason: str) -> Reject:
    return Reject(code, reason, "image")  # the field a medical file comes in


def kind_of(data: bytes) -> str | None:
    """'dicom', 'nifti1', 'nifti2' (gzipped or not) or None, from the bytes alone."""
    if data[128:132] == DICOM_MAGIC:
        return "dicom"
    head = data[:600]
    if head.startswith(GZIP_MAGIC):
        try:
            head = zlib.decompressobj(wbits=31).decompress(data[:4096], 600)
        except zlib.error:
            return None
    for order in "<>":
        size = struct.unpack(f"{order}i", head[:4])[0] if len(head) >= 4 else None
        if size in NIFTI_HEADERS and head[NIFTI_HEADERS[size][0]:][:4] == NIFTI_HEADERS[size][1]:
            return f"nifti{1 if size == 348 else 2}"
    return None


def pseudonym(value: str, salt: str) -> str:
    """A keyed hash of an identifier: equal for equal values under one salt, and not to be
    turned back into the value without the salt."""
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:20]


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI windowing (PS3.3 C.11.2.1.2.1) to [0, 1]."""
    width = max(float(width), 1.0)
    # in float32: exact for 16-bit values, and the result is 8 bits
    scaled = (values.astype(np.float32, copy=False) - np.float32(center - 0.5)) / np.float32(width - 1) + 0.5
    return np.clip(scaled, 0.0, 1.0)


def auto_window(values: np.ndarray) -> tuple[float, float]:
    """The window over the 0.5th to 99.5th percentile of the values (outliers do not flatten it)."""
    low, high = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    return (float(low) + float(high)) / 2, max(float(high) - float(low), 1.0)


def _to_picture(gray: np.ndarray) -> Image.Image:
    # grey until the image path has resized it: a third of the pixels to resample
    return Image.fromarray(np.round(gray * 255).astype(np.uint8), "L")


def _check_pixels(rows: int, columns: int, image: ImageConfig) -> None:
    if rows * columns > image.max_pixels:
        raise Reject("image.bomb", f"medical image slice {columns}x{rows} is over shard.image.max_pixels "
                                   f"({image.max_pixels})")
    if min(rows, columns) < image.min_side:
        raise Reject("image.too_small", f"medical image slice {columns}x{rows} is below the minimum side "
                                        f"{image.min_side}")


def _windowed(values: np.ndarray, cfg: MedicalConfig, from_file: tuple[float, float] | None) -> tuple[np.ndarray, dict]:
    """VALUES (after the modality LUT) windowed to [0, 1] as shard.medical.window says."""
    if isinstance(cfg.window, tuple):
        (center, width), how = cfg.window, "given"
    elif cfg.window in WINDOW_PRESETS:
        (center, width), how = WINDOW_PRESETS[cfg.window], cfg.window
    elif cfg.window == "file" and from_file is not None:
        (center, width), how = from_file, "file"
    else:
        (center, width), how = auto_window(values), "auto"
    return window(values, center, width), {"window": how, "window_center": round(center, 3),
                                           "window_width": round(width, 3)}


def _json_value(value) -> str | float | int | list | None:
    """An allow-listed attribute's value as JSON (numbers as numbers, multi-values as lists)."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat

    if isinstance(value, MultiValue | list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, IS | int):
        return int(value)
    if isinstance(value, DSfloat | float):
        return float(value)
    if value is None or isinstance(value, bytes):
        return None
    return str(value)


def _first(value) -> float:
    """The first of a multi-valued window attribute (a file may list several windows)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _salt(cfg: MedicalConfig) -> str:
    if cfg.id_salt is None:
        raise _reject("medical.no_salt", "a DICOM file, and shard.medical.id_salt is not set (identifiers are "
                                        "replaced by keyed hashes, so DICOM is not read without it)")
    return cfg.id_salt.get_secret_value()


# the readers' loggers (children inherit the level): their messages may quote element values
_READER_LOGGERS = ("pydicom", "nibabel", "pylibjpeg", "openjpeg", "libjpeg")


@functools.cache
def _silence_readers() -> None:
    """Once per process, for good: a level set per file would clear every logger's cache each
    time, a cost per file in a worker with Ray's many loggers."""
    for name in _READER_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pydicom's warnings and log lines quote element values ("Invalid value for VR DA: ..."),
    nibabel's may quote header text: neither speaks in a process that reads medical files, no
    warning escapes while a file is read, and pydicom does not validate values as it reads."""
    from pydicom import config

    _silence_readers()
    mode = config.settings.reading_validation_mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.settings.reading_validation_mode = config.IGNORE
        try:
            yield
        finally:
            config.settings.reading_validation_mode = mode


def read_dicom(data: bytes, cfg: MedicalConfig, image: ImageConfig) -> list[MedicalImage]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    salt = _salt(cfg)
    try:
        with _quiet():
            return _dicom_image(pydicom.dcmread(io.BytesIO(data)), cfg, image, salt)
    except Reject:
        raise
    except (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError,
            NotImplementedError, EOFError, OSError, struct.error) as e:
        # the error's type only: pydicom's messages may quote element values (a name, an ID)
        raise _reject("medical.undecodable", f"DICOM cannot be decoded ({type(e).__name__})") from None


def slice_positions(count: int, slices: str | int) -> list[int]:
    """The slices (0-based) of a COUNT-slice volume or multi-frame file that shard.medical.slices
    keeps: the middle, every one, or N evenly spaced (the middles of N equal runs: 1 is the middle)."""
    if slices == "middle":
        return [count // 2]
    if slices == "all" or slices >= count:
        return list(range(count))
    return [((2 * i + 1) * count) // (2 * slices) for i in range(slices)]


def _part(position: int, count: int, cfg: MedicalConfig) -> str | None:
    """The key suffix of a slice that is a sample of its own (None: the row's one sample)."""
    return None if count == 1 or cfg.slices == "middle" else f"slice-{position:03d}"


def _dicom_image(ds, cfg: MedicalConfig, image: ImageConfig, salt: str) -> list[MedicalImage]:
    """A read DICOM dataset's pictures (its frames that shard.medical.slices keeps) and meta
    (pydicom converts values when they are read, so a malformed one raises here: read_dicom
    turns that into a reject)."""
    from pydicom.pixels import pixel_array

    if "PixelData" not in ds:
        raise _reject("medical.no_pixels", "a DICOM file with no pixel data (a report, a plan, a structure set)")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and not cfg.allow_burned_in:
        raise _reject("medical.burned_in", "the DICOM file says text is burned into its pixels "
                                          "(BurnedInAnnotation YES; shard.medical.allow_burned_in is off)")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_pixels(rows, columns, image)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    meta = {keyword: _json_value(ds[keyword].value) for keyword in cfg.keep if keyword in ds}
    meta.update({"kind": "dicom", "frames": frames})
    for field, keyword in (("patient", "PatientID"), ("study", "StudyInstanceUID")):
        if str(ds.get(keyword, "") or ""):
            meta[field] = pseudonym(str(ds[keyword].value), salt)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    from_file = (_first(center), _first(width)) if center is not None and width is not None else None
    # each kept frame decoded alone, never the whole series at once
    return [_dicom_frame(pixel_array(ds, index=frame if frames > 1 else None), ds, cfg, from_file,
                         {**meta, "frame": frame}, _part(frame, frames, cfg))
            for frame in slice_positions(frames, cfg.slices)]


def _dicom_frame(pixels: np.ndarray, ds, cfg: MedicalConfig, from_file: tuple[float, float] | None, meta: dict,
                 part: str | None) -> MedicalImage:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    rows, columns = pixels.shape[:2]
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        bits = 8 * pixels.dtype.itemsize
    else:
        bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize) or 8)
    if pixels.ndim == 3:  # RGB (pydicom converts YBR), palette colour after its LUT
        scaled = np.clip(pixels.astype(np.float64) / (2**bits - 1), 0.0, 1.0) * 255
        return MedicalImage(Image.fromarray(np.round(scaled).astype(np.uint8), "RGB"), (columns, rows), meta, pixels,
                            part)
    if photometric not in MONOCHROME:
        raise _reject("medical.undecodable", "DICOM single-channel pixels with a photometric interpretation "
                                            "other than MONOCHROME1/2")
    values = apply_modality_lut(pixels, ds)  # e.g. Hounsfield units for CT
    gray, how = _windowed(values, cfg, from_file)
    if photometric == "MONOCHROME1":  # low values are white
        gray = 1.0 - gray
    return MedicalImage(_to_picture(gray), (columns, rows), {**meta, **how}, values, part)


def _nifti_bytes(data: bytes, cfg: MedicalConfig) -> bytes:
    if not data.startswith(GZIP_MAGIC):
        return data
    inflate = zlib.decompressobj(wbits=31)
    try:
        out = inflate.decompress(data, cfg.max_volume_bytes + 1)
    except zlib.error:
        raise _reject("medical.undecodable", "gzipped NIfTI cannot be decompressed") from None
    if len(out) > cfg.max_volume_bytes:
        raise _reject("medical.too_large", f"NIfTI volume is over shard.medical.max_volume_bytes "
                                          f"({cfg.max_volume_bytes}) uncompressed")
    return out


def read_nifti(data: bytes, kind: str, cfg: MedicalConfig, image: ImageConfig) -> list[MedicalImage]:
    import nibabel

    raw = _nifti_bytes(data, cfg)
    try:
        volume = (nibabel.Nifti1Image if kind == "nifti1" else nibabel.Nifti2Image).from_bytes(raw)
    except (nibabel.filebasedimages.ImageFileError, nibabel.spatialimages.HeaderDataError,
            nibabel.wrapstruct.WrapStructError, ValueError, EOFError, struct.error) as e:
        raise _reject("medical.undecodable", f"NIfTI cannot be read ({type(e).__name__})") from None
    shape = volume.shape
    if len(shape) < 2:
        raise _reject("medical.undecodable", f"NIfTI of {len(shape)} dimension(s), not an image")
    canonical = nibabel.as_closest_canonical(volume)  # RAS+: the same anatomy the same way round
    shape = canonical.shape
    _check_pixels(shape[1], shape[0], image)
    count = shape[2] if len(shape) > 2 else 1
    zooms = [round(float(z), 4) for z in canonical.header.get_zooms()[:3]]
    meta = {"kind": kind, "shape": [int(s) for s in shape], "spacing": zooms}
    return [_nifti_slice(canonical, position if len(shape) > 2 else None, cfg, meta, _part(position, count, cfg))
            for position in slice_positions(count, cfg.slices)]


def _nifti_slice(canonical, position: int | None, cfg: MedicalConfig, meta: dict, part: str | None) -> MedicalImage:
    """The axial slice at POSITION (None: a 2-D image) of a canonical volume, at its first time point."""
    shape = canonical.shape
    index = (slice(None), slice(None)) + ((position,) if position is not None else ()) + (0,) * max(0, len(shape) - 3)
    try:
        values = np.asarray(canonical.dataobj[index], dtype=np.float64)  # one slice read
    except (ValueError, EOFError, OSError) as e:
        raise _reject("medical.undecodable", f"NIfTI voxels cannot be read ({type(e).__name__})") from None
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    # axial slice in RAS+: rows run left to right, columns posterior to anterior; shown
    # radiologically (anterior up, the patient's right on the left)
    values = np.rot90(values)
    gray, how = _windowed(values, cfg, None)
    return MedicalImage(_to_picture(gray), (int(gray.shape[1]), int(gray.shape[0])),
                        {**meta, "slice": position, **how}, values, part)


def read_medical(data: bytes, kind: str, cfg: MedicalConfig, image: ImageConfig) -> list[MedicalImage]:
    """A file of KIND (kind_of's answer) as the pictures and meta of the slices shard.medical.slices
    keeps (one for a 2-D image, or with `middle`)."""
    if kind == "dicom":
        return read_dicom(data, cfg, image)
    with _quiet():
        return read_nifti(data, kind, cfg, image)

