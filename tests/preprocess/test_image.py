import io

import numpy as np
import pytest
from PIL import Image

from tessera.preprocess.config import AugmentConfig, ImageConfig
from tessera.preprocess.image import decode_image, process_image, resize_image, to_rgb8
from tessera.preprocess.reject import Reject
from tessera.preprocess.sample import sample_rng
from tests.conftest import DIRTY, MINI


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def dirty(name: str) -> bytes:
    return (DIRTY / "files" / name).read_bytes()


def decoded(data: bytes, **cfg) -> np.ndarray:
    img, _ = decode_image(data, ImageConfig(**cfg))
    return np.asarray(img)


@pytest.mark.parametrize("name, reason", [
    ("truncated.jpg", "image truncated"),
    ("empty.png", "empty file"),
    ("not-an-image.jpg", "not an image"),
    ("bomb.png", "decompression bomb"),
    ("dot.png", "below the minimum side"),
])
def test_bad_images_are_rejected_with_their_reason(name, reason):
    with pytest.raises(Reject) as err:
        decode_image(dirty(name), ImageConfig())
    assert err.value.modality == "image"
    assert reason in err.value.reason


def test_a_cut_png_and_a_bomb_get_plain_image_reasons():
    cut = (MINI / "images" / "astronaut.png").read_bytes()[:3000]  # its header, part of its first chunk
    with pytest.raises(Reject) as err:
        decode_image(cut, ImageConfig())
    assert (err.value.modality, err.value.reason) == ("image", "image truncated")
    with pytest.raises(Reject) as err:  # the configured limit is what the reason names, not Pillow's
        decode_image(dirty("bomb.png"), ImageConfig(max_pixels=40_000_000))
    assert "shard.image.max_pixels (40000000)" in err.value.reason and "178956970" not in err.value.reason


def test_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (300, 200)))
    with pytest.raises(Reject, match="decompression bomb: 300x200"):
        decode_image(data, ImageConfig(max_pixels=50_000))
    assert decoded(data, max_pixels=60_000).shape == (200, 300, 3)


def test_format_allowlist():
    data = encode(Image.new("RGB", (32, 32)), "BMP")
    with pytest.raises(Reject, match="format BMP not in the allowed formats"):
        decode_image(data, ImageConfig(formats=("JPEG", "PNG")))


def test_exif_orientation_makes_the_image_upright():
    img, size = decode_image(dirty("rotated.jpg"), ImageConfig())
    assert Image.open(io.BytesIO(dirty("rotated.jpg"))).size == (640, 427)
    assert img.size == (427, 640) and size == (427, 640)


def test_sixteen_bit_is_scaled_not_clipped():
    raw = np.asarray(Image.open(io.BytesIO(dirty("gray16.png"))))
    assert raw.dtype == np.uint16 and raw.max() > 255
    out = decoded(dirty("gray16.png"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], np.rint(raw / 257.0).astype(np.uint8))
    assert len(np.unique(out)) > 32  # a ramp, not a white square


def test_cmyk_becomes_rgb_with_the_same_colours():
    out = decoded(dirty("cmyk.jpg"))
    assert out.shape[2] == 3
    reference = np.asarray(Image.open(io.BytesIO(dirty("ok.jpg"))).convert("RGB"), np.float32)
    assert abs(out.astype(np.float32).mean() - reference.mean()) < 20  # not inverted


def test_alpha_is_flattened_onto_the_background():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))
    out = np.asarray(to_rgb8(rgba, (10, 20, 30)))
    assert tuple(out[0, 12]) == (10, 20, 30) and tuple(out[0, 2]) == (0, 0, 255)


def test_palette_and_grayscale_become_rgb():
    gif = (MINI / "images" / "tiny-gif.gif").read_bytes()
    assert decoded(gif).shape[2] == 3
    gray = encode(Image.new("L", (20, 20), 77))
    assert tuple(decoded(gray)[0, 0]) == (77, 77, 77)


def test_resize_modes():
    img = Image.new("RGB", (400, 200))
    assert resize_image(img, 100, "crop").size == (100, 100)
    assert resize_image(img, 100, "keep_ratio").size == (100, 50)
    assert resize_image(img, 100, "none").size == (400, 200)


def test_centre_crop_keeps_the_centre():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # white centre third
    out = np.asarray(resize_image(Image.fromarray(arr), 50, "crop"))
    assert out.mean() > 250


def test_reduced_size_jpeg_decoding_still_fills_the_target():
    big = encode(Image.new("RGB", (2000, 1200), (90, 120, 150)), "JPEG", quality=95)
    cfg = ImageConfig(size=224)
    (result,) = process_image(big, cfg, sample_rng(0, "k"))
    assert Image.open(io.BytesIO(result.data)).size == (224, 224)
    draft, _ = decode_image(big, cfg, 224)
    assert min(draft.size) >= 224 and draft.size[0] < 2000  # decoded at reduced size


def test_augmentation_is_seeded_and_recorded():
    data = (MINI / "images" / "coffee.png").read_bytes()
    aug = AugmentConfig(random_resized_crop=True, hflip=True, rotate_degrees=10, brightness=0.3,
                        contrast=0.3, saturation=0.3, noise_std=3)
    cfg = ImageConfig(size=64, augment=aug)
    (first,) = process_image(data, cfg, sample_rng(7, "coffee"))
    (again,) = process_image(data, cfg, sample_rng(7, "coffee"))
    (other,) = process_image(data, cfg, sample_rng(8, "coffee"))
    assert first.data == again.data and first.meta == again.meta
    assert first.data != other.data
    assert {"crop", "rotate", "brightness", "contrast", "saturation", "noise_std"} <= set(first.meta["augment"])


def test_no_augmentation_records_none():
    data = (MINI / "images" / "coffee.png").read_bytes()
    (result,) = process_image(data, ImageConfig(size=32), sample_rng(0, "coffee"))
    assert "augment" not in result.meta and result.meta["size"] == [32, 32]


@pytest.mark.parametrize("fmt, pil_format", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_formats(fmt, pil_format):
    data = (MINI / "images" / "horse.png").read_bytes()
    (result,) = process_image(data, ImageConfig(size=48, output_format=fmt), sample_rng(0, "horse"))
    out = Image.open(io.BytesIO(result.data))
    assert out.format == pil_format and out.size == (48, 48) and out.mode == "RGB"
    assert len(result.histogram) == 768 and sum(result.histogram) == 48 * 48 * 3
