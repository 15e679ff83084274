"""Video bytes -> N frames sampled at a fixed rate, resized, stored as a short H.264 MP4 (the
default: a fraction of the raw frames' bytes, and a member any video tool opens) or as a raw
uint8 .npy array (video.encoding: frames). `decode_frames` reads either back."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from tessera.preprocess.config import VideoConfig
from tessera.preprocess.image import resize_image
from tessera.preprocess.modality import Modality, Stored
from tessera.preprocess.reject import Reject

if TYPE_CHECKING:
    import av

NPY_MAGIC = b"\x93NUMPY"
# swscale picks its thread count from the CPUs by default: one, so that a retried task on a busy
# node converts colours exactly as the first try did (a stored MP4 once differed after a retry)
SCALER_THREADS = 1
# x264 reads uninitialised memory (valgrind) when a row holds an odd number of 16-pixel
# macroblocks, and then the same frames now and then give other bytes (1 encode in ~1,200 under
# load; a retried shard's MP4 differed in CI): frames are encoded padded to a multiple of 32, the
# padding cut off again by the stream's own cropping rectangle (decoders show the asked size)
ENCODED_MULTIPLE = 32


def _av():
    """PyAV, which the base (edge) install leaves out (`tessera[video]` adds it): a video is then
    a reject that says so."""
    try:
        import av
    except ModuleNotFoundError:
        raise Reject("video.no_decoder", "video needs PyAV, which this install lacks: pip install "
                                         "'tessera[video]'", "video") from None
    return av


@dataclass
class VideoResult:
    data: bytes  # MP4 (H.264) or .npy of shape (frames, size, size, 3) uint8, loads without pickle
    meta: dict


def encode_mp4(frames: np.ndarray, fps: float, crf: int) -> bytes:
    """uint8 frames (T, H, W, 3) as H.264 in MP4. One encoder thread, one scaler thread, fixed
    options and whole macroblock pairs: the same frames always give the same bytes."""
    bottom, right = -frames.shape[1] % ENCODED_MULTIPLE, -frames.shape[2] % ENCODED_MULTIPLE
    frames = np.pad(frames, ((0, 0), (0, bottom), (0, right), (0, 0)), mode="edge")
    av, buf = _av(), io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "medium", "x264-params": f"crop-rect=0,0,{right},{bottom}"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame.reformat(format="yuv420p", threads=SCALER_THREADS)))
        container.mux(stream.encode())
    return buf.getvalue()


def decode_frames(payload: bytes) -> np.ndarray:
    """A stored video member (MP4 or .npy) as uint8 frames (T, H, W, 3)."""
    if payload.startswith(NPY_MAGIC):
        return np.load(io.BytesIO(payload), allow_pickle=False)
    with _av().open(io.BytesIO(payload), mode="r") as container:
        return np.stack([frame.to_ndarray(format="rgb24", threads=SCALER_THREADS)
                         for frame in container.decode(video=0)])


def _sample_frames(container: av.container.InputContainer, cfg: VideoConfig) -> tuple[list, dict]:
    if not container.streams.video:
        raise Reject("video.no_stream", "no video stream")
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = (container.duration or 0) / _av().time_base
    if seconds > cfg.max_seconds:
        raise Reject("video.too_long", f"video is {seconds:.1f} s, over {cfg.max_seconds} s")
    if cfg.min_seconds is not None and seconds < cfg.min_seconds:
        raise Reject("video.too_short", f"video is {seconds:.2f} s, under shard.video.min_seconds {cfg.min_seconds}")
    if stream.frames > cfg.max_frames:
        raise Reject("video.too_many_frames", f"video has {stream.frames} frames, over {cfg.max_frames}")
    # one decoder thread: frame threading changes when frames come out of the decoder, and
    # byte-identical MP4 members across runs are the goal (CI runs saw them differ, with frame
    # threads and again, under heavy load, with slice threads)
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1
    targets = [i / cfg.fps for i in range(cfg.frames)]
    picked: list[np.ndarray] = []
    started = time.monotonic()
    for decoded, frame in enumerate(container.decode(stream), start=1):
        if decoded > cfg.max_frames:
            raise Reject("video.too_many_frames", f"video decodes more than {cfg.max_frames} frames")
        if time.monotonic() - started > cfg.max_decode_seconds:
            raise Reject("video.too_slow", f"video decoding took over {cfg.max_decode_seconds} s")
        t = frame.time if frame.time is not None else decoded / float(stream.average_rate or cfg.fps)
        if t + 1e-6 >= targets[len(picked)]:
            picked.append(np.asarray(resize_image(frame.to_image(threads=SCALER_THREADS), cfg.size, "crop")))
            if len(picked) == cfg.frames:
                break
    meta = {"source_seconds": round(seconds, 4), "fps": cfg.fps, "frames": cfg.frames, "real_frames": len(picked)}
    return picked, meta


def process_video(data: bytes, cfg: VideoConfig) -> VideoResult:
    if not data:
        raise Reject("input.empty", "empty file", "video")
    av = _av()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            frames, meta = _sample_frames(container, cfg)
    except av.error.FFmpegError as e:
        raise Reject("video.undecodable", f"video cannot be decoded: {e}") from None
    if not frames:
        raise Reject("video.undecodable", "no frames could be decoded")
    # Clips shorter than frames/fps repeat their last frame so every sample has one shape.
    frames = np.stack(frames + [frames[-1]] * (cfg.frames - len(frames)))
    meta["size"], meta["encoding"] = cfg.size, cfg.encoding
    if cfg.encoding == "mp4":
        return VideoResult(encode_mp4(frames, cfg.fps, cfg.crf), meta)
    buf = io.BytesIO()
    np.save(buf, frames, allow_pickle=False)
    return VideoResult(buf.getvalue(), meta)


def _stored(row, raw: dict[str, bytes], cfg, rng) -> Stored | None:
    if "video" not in raw:
        return None
    video = process_video(raw["video"], cfg.video)
    return Stored(video.data, video.meta)


MEMBER = {"mp4": "mp4", "frames": "frames.npy"}  # by video.encoding
MODALITY = Modality("video", file_field="video", inline_field=None, member=lambda cfg: MEMBER[cfg.video.encoding],
                    members=tuple(MEMBER.values()), process=_stored, encoder="clip", shown_as="poster frames",
                    served_inline=True)
