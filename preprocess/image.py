"""Image bytes (any format Pillow reads, DICOM, NIfTI) -> validated, oriented, 8-bit RGB, resized,
augmented, encoded bytes."""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageEnhance, ImageOps, UnidentifiedImageError

from tessera.preprocess.config import AugmentConfig, ImageConfig, MedicalConfig
from tessera.preprocess.medical import RAW_MEMBER, kind_of, read_medical
from tessera.preprocess.modality import Modality, Stored
from tessera.preprocess.near import image_phash
from tessera.preprocess.reject import Reject

PIL_SAVE = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass
class ImageResult:
    data: bytes
    meta: dict
    histogram: list[int]  # of the stored pixels (3 x 256 counts), for dataset statistics
    phash: int | None = None  # of the upright image before resizing (near dedup), when asked for
    raw: bytes | None = None  # a medical image's values before windowing (.npy), with medical.keep_raw
    part: str | None = None  # "slice-NNN": one of several slices of its file, each a sample
    part_sha256: str | None = None  # of the slice's values: what tells it from its file's other slices


def _undecodable(error: Exception) -> Reject:
    """Pillow's error on bytes it could not read as the image reject a person reads."""
    if "truncated" in str(error).lower():
        return Reject("image.truncated", "image truncated")
    return Reject("image.undecodable", f"image cannot be decoded: {error}")


def open_image(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Open and check format and pixel count; nothing is decoded yet."""
    if not data:
        raise Reject("input.empty", "empty file", "image")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # over Pillow's own ceiling (2 x MAX_IMAGE_PIXELS), ours is lower
        raise Reject("image.bomb", f"decompression bomb: over shard.image.max_pixels ({cfg.max_pixels})") from None
    except UnidentifiedImageError:
        raise Reject("image.unrecognised", "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:  # a header cut short or broken (a PNG's chunks)
        raise _undecodable(e) from None
    if img.format not in cfg.formats:
        raise Reject("image.format", f"format {img.format} not in the allowed formats {list(cfg.formats)}")
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise Reject("image.bomb", f"decompression bomb: {w}x{h} = {w * h / 1e9:.2f} gigapixels, over "
                              f"shard.image.max_pixels ({cfg.max_pixels})")
    return img


def to_rgb8(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit scaled (not clipped), alpha flattened."""
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.float64)
        levels = np.clip(np.rint(np.clip(wide, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(levels, "L").convert("RGB")
    if img.mode == "F":
        values = np.asarray(img)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(
    data: bytes, cfg: ImageConfig, min_decoded_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (upright 8-bit RGB image, its full-resolution upright width x height).

    JPEGs are DCT-downscaled while decoding when the target size allows."""
    img = open_image(data, cfg)
    source_size = img.size
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError) as e:
        raise _undecodable(e) from None
    if orientation in TRANSPOSING_ORIENTATIONS:
        source_size = source_size[::-1]
    if min(source_size) < cfg.min_side:
        raise Reject("image.too_small",
                     f"image {source_size[0]}x{source_size[1]} is below the minimum side {cfg.min_side}")
    ratio = max(source_size) / min(source_size)
    if cfg.max_aspect_ratio is not None and ratio > cfg.max_aspect_ratio:
        raise Reject("image.aspect_ratio", f"image {source_size[0]}x{source_size[1]} has aspect ratio {ratio:.2f}, "
                                           f"over shard.image.max_aspect_ratio {cfg.max_aspect_ratio}")
    if min_decoded_side and img.format == "JPEG":
        # draft() keeps both sides >= the request, so quality is not lost downstream.
        img.draft(None, (min_decoded_side, min_decoded_side))
    try:
        img.load()
        if orientation != 1:
            ImageOps.exif_transpose(img, in_place=True)
    except Image.DecompressionBombError:
        raise Reject("image.bomb", f"decompression bomb: over shard.image.max_pixels ({cfg.max_pixels})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _undecodable(e) from None
    return to_rgb8(img, cfg.background), source_size


def resize_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """'crop': shorter side to size then centre crop; 'keep_ratio': longer side to size."""
    if mode == "none":
        return img
    w, h = img.size
    if mode == "keep_ratio":
        scale = size / max(w, h)
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (rw - size) / 2 / scale, (rh - size) / 2 / scale
    box = (left, top, left + size / scale, top + size / scale)
    return img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)


def _random_resized_crop(img: Image.Image, aug: AugmentConfig, rng: np.random.Generator, size: int):
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:  # no valid crop drawn: the whole image, as torchvision falls back
        x, y, cw, ch = 0, 0, w, h
    out = img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch), reducing_gap=3.0)
    return out, {"crop": [x, y, cw, ch]}


def augment_image(img: Image.Image, aug: AugmentConfig, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Flip, rotation, colour jitter and noise, drawn from rng; returns the parameters used."""
    params: dict = {}
    if aug.hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        params["hflip"] = True
    if aug.rotate_degrees:
        angle = float(rng.uniform(-aug.rotate_degrees, aug.rotate_degrees))
        img = img.rotate(angle, Image.BILINEAR)
        params["rotate"] = round(angle, 4)
    for name, amount, enhancer in (
        ("brightness", aug.brightness, ImageEnhance.Brightness),
        ("contrast", aug.contrast, ImageEnhance.Contrast),
        ("saturation", aug.saturation, ImageEnhance.Color),
    ):
        if amount:
            factor = float(rng.uniform(1 - amount, 1 + amount))
            img = enhancer(img).enhance(factor)
            params[name] = round(factor, 4)
    if aug.noise_std:
        noisy = np.asarray(img, np.float32) + rng.normal(0, aug.noise_std, (img.size[1], img.size[0], 3))
        img = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
        params["noise_std"] = aug.noise_std
    return img, params


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, PIL_SAVE[fmt], quality=quality)
    return buf.getvalue()


def draft_side(cfg: ImageConfig) -> int | None:
    """Smallest decoded shorter side that still fills the output after crops."""
    if cfg.resize != "crop":
        return None  # keep_ratio targets the longer side, so the shorter side cannot be bounded
    if cfg.augment.random_resized_crop:
        # the smallest crop keeps sqrt(scale) of each side and can be off-ratio
        shrink = math.sqrt(cfg.augment.crop_scale[0]) / math.sqrt(cfg.augment.crop_ratio[1])
        return math.ceil(cfg.size / shrink)
    return cfg.size


def process_image(data: bytes, cfg: ImageConfig, rng: np.random.Generator, phash: bool = False,
                  medical: MedicalConfig | None = None) -> list[ImageResult]:
    """The stored picture(s) of an image file: one, or with MEDICAL, a DICOM or NIfTI file (known
    by its bytes) as the slices shard.medical.slices keeps (each windowed to an 8-bit picture,
    its allow-listed attributes in the meta's `medical`); without, a file Pillow does not
    recognise is a reject."""
    kind = kind_of(data) if medical is not None else None
    if not kind:
        img, source_size = decode_image(data, cfg, draft_side(cfg))
        return [_stored_picture(img, source_size, {}, cfg, rng, phash)]
    results = []
    for read in read_medical(data, kind, medical, cfg):
        result = _stored_picture(read.picture, read.source_size, {"medical": read.meta}, cfg, rng, phash)
        result.raw = read.raw_npy() if medical.keep_raw else None
        if read.part is not None:
            result.part = read.part
            result.part_sha256 = hashlib.sha256(np.ascontiguousarray(read.values).tobytes()).hexdigest()
        results.append(result)
    return results


def _stored_picture(img: Image.Image, source_size: tuple[int, int], meta: dict, cfg: ImageConfig,
                    rng: np.random.Generator, phash: bool) -> ImageResult:
    """An upright picture resized, augmented (drawing from RNG) and encoded."""
    fingerprint = image_phash(img) if phash else None
    meta = {"source_size": list(source_size), **meta}
    if cfg.augment.random_resized_crop and cfg.resize == "crop":
        img, crop = _random_resized_crop(img, cfg.augment, rng, cfg.size)
        meta["augment"] = crop
    else:
        img = resize_image(img, cfg.size, cfg.resize)
    img, params = augment_image(img, cfg.augment, rng)
    img = img.convert("RGB") if img.mode != "RGB" else img  # a medical picture is grey until here
    if params:
        meta["augment"] = {**meta.get("augment", {}), **params}
    meta["size"] = list(img.size)
    return ImageResult(encode_image(img, cfg.output_format, cfg.quality), meta, img.histogram(), fingerprint)


def _stored(row, raw: dict[str, bytes], cfg, rng) -> list[Stored] | None:
    if "image" not in raw:
        return None
    return [Stored(image.data, image.meta, pixel_histogram=image.histogram, phash=image.phash,
                   group=image.meta.get("medical", {}).get("patient"),
                   extra={RAW_MEMBER: image.raw} if image.raw is not None else {},
                   part=image.part, part_sha256=image.part_sha256)
            for image in process_image(raw["image"], cfg.image, rng, medical=cfg.medical,
                                       phash=cfg.near_dedup.image.max_distance is not None)]


# the member of an image by image.output_format: JPEG as `.jpeg`, which webdataset and HF
# datasets decode like `.jpg` but Ray Data's default decoder leaves as bytes (it turns `.jpg`
# and `.png` into arrays and then fails on a shard where some sample has no image)
MEMBER = {"jpg": "jpeg", "png": "png", "webp": "webp"}
MODALITY = Modality("image", file_field="image", inline_field=None, member=lambda cfg: MEMBER[cfg.image.output_format],
                    members=(*MEMBER.values(), "jpg"), process=_stored, encoder="clip", shown_as="thumbnail",
                    served_inline=True)
