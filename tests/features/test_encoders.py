"""Encoders without Ray: identities, batching, pooling, video frames."""

import io

import numpy as np
import soundfile as sf
from PIL import Image

from tessera.features.config import AudioEncoderConfig, EmbedConfig, ImageEncoderConfig
from tessera.features.encoders import ClipImageEncoder, Wav2Vec2AudioEncoder, build_encoders


def flac(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def test_identity_follows_weights_and_preprocessing():
    a = ClipImageEncoder(ImageEncoderConfig()).identity()
    assert a == ClipImageEncoder(ImageEncoderConfig()).identity()
    assert a != ClipImageEncoder(ImageEncoderConfig(seed=1)).identity()
    assert a != ClipImageEncoder(ImageEncoderConfig(image_size=112)).identity()
    encoders = build_encoders(EmbedConfig())
    assert encoders["video"].identity() == encoders["image"].identity() + "/frames"


def test_image_batch_equals_one_by_one():
    encoder = ClipImageEncoder(ImageEncoderConfig())
    encoder.load()
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
        payloads.append(buf.getvalue())
    items = [encoder.prepare(p) for p in payloads]
    batch = encoder.embed(items)
    single = np.concatenate([encoder.embed([x]) for x in items])
    assert batch.shape == (3, encoder.dim)
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_audio_vector_does_not_depend_on_its_batch():
    encoder = Wav2Vec2AudioEncoder(AudioEncoderConfig())
    encoder.load()
    t = np.arange(40000) / 16000
    short = encoder.prepare(flac(0.3 * np.sin(2 * np.pi * 300 * t[:8000])))
    similar = encoder.prepare(flac(0.3 * np.sin(2 * np.pi * 400 * t[:12000])))
    long = encoder.prepare(flac(0.3 * np.sin(2 * np.pi * 500 * t)))
    assert len(short[0]) == len(similar[0]) == 16000 and short[1] == 8000 and len(long[0]) == 48000
    alone = encoder.embed([short])[0]
    batched = encoder.embed([long, short, similar])
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)
    np.testing.assert_allclose(batched[0], encoder.embed([long])[0], atol=1e-5)


def test_video_frames_go_through_the_image_encoder():
    encoders = build_encoders(EmbedConfig())
    video, image = encoders["video"], encoders["image"]
    video.load()
    frames = np.random.default_rng(1).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, frames, allow_pickle=False)
    clip = video.prepare(buf.getvalue())
    assert clip.shape == (4, 3, 224, 224)
    flat = video.embed([clip, clip[::-1]])
    assert flat.shape == (2, 4 * image.dim)
    per_frame = image.embed(list(clip))
    np.testing.assert_allclose(flat[0].reshape(4, -1), per_frame, atol=1e-5)
