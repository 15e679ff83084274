import io
import sys

import av
import numpy as np
import pytest

from tessera.preprocess.config import VideoConfig
from tessera.preprocess.reject import Reject
from tessera.preprocess.video import decode_frames, process_video
from tests.conftest import MINI


def frames_of(result) -> np.ndarray:
    return decode_frames(result.data)


def make_video(seconds: float, fps: int = 10, size: int = 64) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            arr = np.full((size, size, 3), (i * 20) % 256, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def test_frames_sampled_at_a_fixed_rate_and_resized():
    data = (MINI / "video" / "china.mp4").read_bytes()
    result = process_video(data, VideoConfig(frames=6, fps=3, size=32))
    arr = frames_of(result)
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8
    assert result.meta["real_frames"] == 6
    assert not np.array_equal(arr[0], arr[-1])  # a pan: frames differ


def test_frame_times_follow_the_sampling_rate():
    # brightness steps by 20 per frame at 10 fps; sampling at 2 fps takes every 5th frame
    arr = frames_of(process_video(make_video(2.0), VideoConfig(frames=4, fps=2, size=16, encoding="frames")))
    levels = arr.reshape(4, -1).mean(1)
    np.testing.assert_allclose(levels, [0, 100, 200, 44], atol=8)


def test_short_clips_repeat_their_last_frame():
    result = process_video(make_video(0.5), VideoConfig(frames=8, fps=4, size=16))
    arr = frames_of(result)
    assert result.meta["real_frames"] == 2 and arr.shape[0] == 8
    assert np.array_equal(arr[1], arr[7])


def test_limits():
    data = make_video(2.0)
    with pytest.raises(Reject, match="over 1.0 s"):
        process_video(data, VideoConfig(max_seconds=1.0))
    with pytest.raises(Reject, match="frames, over 5"):
        process_video(data, VideoConfig(max_frames=5))


def test_bad_bytes_are_rejected():
    with pytest.raises(Reject, match="video cannot be decoded"):
        process_video(b"\x00" * 1000, VideoConfig())
    with pytest.raises(Reject, match="empty file"):
        process_video(b"", VideoConfig())


def test_mp4_keeps_frame_count_size_and_content_at_a_fraction_of_the_bytes():
    data = (MINI / "video" / "astronaut.mp4").read_bytes()
    raw = process_video(data, VideoConfig(encoding="frames"))
    mp4 = process_video(data, VideoConfig())
    assert mp4.data[4:8] == b"ftyp" and mp4.meta["encoding"] == "mp4" and mp4.meta["frames"] == 8
    exact, decoded = frames_of(raw), frames_of(mp4)
    assert decoded.shape == exact.shape == (8, 112, 112, 3) and decoded.dtype == np.uint8
    psnr = 10 * np.log10(255**2 / np.mean((decoded.astype(float) - exact) ** 2))
    assert psnr > 30, psnr  # CRF 18: visually lossless
    assert len(mp4.data) * 5 < len(raw.data)
    assert process_video(data, VideoConfig()).data == mp4.data  # deterministic bytes


def test_mp4_needs_an_even_size():
    with pytest.raises(ValueError, match="must be even"):
        VideoConfig(size=111)
    assert VideoConfig(size=111, encoding="frames").size == 111


@pytest.mark.parametrize("size", [80, 96, 112])
def test_frames_are_encoded_in_whole_macroblock_pairs_and_shown_at_the_asked_size(size):
    """Padded to a multiple of 32 for x264 (an odd number of macroblocks a row makes it read
    uninitialised memory), cropped back by the stream: decoders see SIZE."""
    data = (MINI / "video" / "astronaut.mp4").read_bytes()
    mp4 = process_video(data, VideoConfig(size=size))
    with av.open(io.BytesIO(mp4.data)) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (size, size)
    assert frames_of(mp4).shape == (8, size, size, 3)


def test_without_pyav_a_video_is_a_reject_naming_the_extra(monkeypatch):
    """The base (edge) install leaves PyAV out: a video sample says what to install."""
    monkeypatch.setitem(sys.modules, "av", None)  # (import av now fails, as where it is not installed)
    with pytest.raises(Reject) as e:
        process_video(make_video(1.0), VideoConfig())
    assert e.value.code == "video.no_decoder" and "tessera[video]" in e.value.reason
