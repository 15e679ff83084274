import io

import numpy as np
import pytest
import soundfile as sf

from tessera.preprocess.audio import process_audio, wav_truncation
from tessera.preprocess.config import AudioConfig
from tessera.preprocess.reject import Reject
from tests.conftest import DIRTY, MINI


def wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.25) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(data), dtype="float32")


def test_truncated_wav_is_rejected():
    data = (DIRTY / "files" / "truncated.wav").read_bytes()
    assert "declares 106610 bytes, file holds 16" in wav_truncation(data)
    with pytest.raises(Reject, match="audio truncated"):
        process_audio(data, AudioConfig())


def test_nan_is_rejected():
    with pytest.raises(Reject, match="audio contains NaN"):
        process_audio((DIRTY / "files" / "nan.wav").read_bytes(), AudioConfig())
    bad = tone(0.5, 8000)
    bad[100] = np.inf
    with pytest.raises(Reject, match="audio contains Inf"):
        process_audio(wav(bad, 8000, "FLOAT"), AudioConfig())


def test_silence_survives_peak_and_rms_normalization():
    for mode in ("peak", "rms"):
        result = process_audio((DIRTY / "files" / "silence.wav").read_bytes(), AudioConfig(normalize=mode))
        samples, rate = decode(result.data)
        assert result.meta["silent"] is True and np.all(samples == 0) and rate == 16000


def test_mono_resampled_and_peak_normalized():
    stereo = np.stack([tone(1.0, 44100), tone(1.0, 44100)], axis=1)
    result = process_audio(wav(stereo, 44100), AudioConfig(sample_rate=16000, target_db=-1.0))
    samples, rate = decode(result.data)
    assert rate == 16000 and samples.ndim == 1 and abs(len(samples) - 16000) <= 1
    assert abs(20 * np.log10(np.abs(samples).max()) - (-1.0)) < 0.05
    # a real resampler keeps the tone: energy stays at 440 Hz
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * rate / len(samples) - 440) < 2


def test_rms_normalization_never_clips():
    spiky = tone(1.0, 16000, amp=0.01)
    spiky[10] = 0.9
    result = process_audio(wav(spiky, 16000), AudioConfig(normalize="rms", target_db=-3.0))
    assert np.abs(decode(result.data)[0]).max() <= 1.0


def test_max_duration_truncates_or_rejects():
    long = wav(tone(3.0, 16000), 16000)
    result = process_audio(long, AudioConfig(max_seconds=1.0))
    assert result.meta["truncated"] and len(decode(result.data)[0]) == 16000
    with pytest.raises(Reject, match="over 1.0 s"):
        process_audio(long, AudioConfig(max_seconds=1.0, on_too_long="reject"))


def test_a_long_clip_is_measured_from_its_header_and_decoded_only_up_to_the_limit():
    clip = np.concatenate([tone(20.0, 22050), tone(50.0, 22050, freq=220.0)])  # 70 s
    data = wav(clip, 22050)
    with pytest.raises(Reject, match=r"audio is 70.0 s, over 30.0 s"):
        process_audio(data, AudioConfig(on_too_long="reject"))
    result = process_audio(data, AudioConfig())  # truncated at 30 s: what lies past 31 s is never decoded ...
    garbled = np.concatenate([clip[: 31 * 22050], np.full(39 * 22050, 0.9, np.float32)])
    assert process_audio(wav(garbled, 22050), AudioConfig()).data == result.data  # ... so it cannot matter
    assert result.meta["truncated"] and result.meta["source_seconds"] == 70.0 and result.meta["seconds"] == 30.0


def test_flac_ogg_input_and_wav_output():
    flac = wav(tone(0.5, 22050), 22050, fmt="FLAC")
    ogg = wav(tone(0.5, 22050), 22050, subtype="VORBIS", fmt="OGG")
    for data in (flac, ogg):
        out = process_audio(data, AudioConfig(output_format="wav"))
        assert sf.info(io.BytesIO(out.data)).subtype == "PCM_16"
    with pytest.raises(Reject, match="format OGG not in the allowed formats"):
        process_audio(ogg, AudioConfig(formats=("WAV",)))


def test_garbage_is_rejected():
    with pytest.raises(Reject, match="audio cannot be decoded"):
        process_audio(b"not audio at all" * 10, AudioConfig())


def test_real_narration():
    result = process_audio((MINI / "audio" / "horse.wav").read_bytes(), AudioConfig())
    assert result.meta["source_rate"] == 22050 and result.meta["rate"] == 16000
    assert -40 < result.rms_db < 0
