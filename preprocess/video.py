"""Video bytes -> N frames sampled at a fixed rate, resized, as a uint8 .npy array."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import av
import numpy as np

from preprocess.config import VideoConfig
from preprocess.image import resize_image
from preprocess.reject import Reject


@dataclass
class VideoResult:
    data: bytes  # .npy of shape (frames, size, size, 3), uint8; loads without pickle
    meta: dict


def _sample_frames(container: av.container.InputContainer, cfg: VideoConfig) -> tuple[list, dict]:
    if not container.streams.video:
        raise Reject("video", "no video stream")
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = (container.duration or 0) / av.time_base
    if seconds > cfg.max_seconds:
        raise Reject("video", f"video is {seconds:.1f} s, over {cfg.max_seconds} s")
    if stream.frames > cfg.max_frames:
        raise Reject("video", f"video has {stream.frames} frames, over {cfg.max_frames}")
    stream.thread_type = "AUTO"
    targets = [i / cfg.fps for i in range(cfg.frames)]
    picked: list[np.ndarray] = []
    started = time.monotonic()
    for decoded, frame in enumerate(container.decode(stream), start=1):
        if decoded > cfg.max_frames:
            raise Reject("video", f"video decodes more than {cfg.max_frames} frames")
        if time.monotonic() - started > cfg.max_decode_seconds:
            raise Reject("video", f"video decoding took over {cfg.max_decode_seconds} s")
        t = frame.time if frame.time is not None else decoded / float(stream.average_rate or cfg.fps)
        if t + 1e-6 >= targets[len(picked)]:
            picked.append(np.asarray(resize_image(frame.to_image(), cfg.size, "crop")))
            if len(picked) == cfg.frames:
                break
    meta = {"source_seconds": round(seconds, 4), "fps": cfg.fps, "frames": cfg.frames, "real_frames": len(picked)}
    return picked, meta


def process_video(data: bytes, cfg: VideoConfig) -> VideoResult:
    if not data:
        raise Reject("video", "empty file")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            frames, meta = _sample_frames(container, cfg)
    except av.error.FFmpegError as e:
        raise Reject("video", f"video cannot be decoded: {e}") from None
    if not frames:
        raise Reject("video", "no frames could be decoded")
    # Clips shorter than frames/fps repeat their last frame so every sample has one shape.
    frames += [frames[-1]] * (cfg.frames - len(frames))
    buf = io.BytesIO()
    np.save(buf, np.stack(frames), allow_pickle=False)
    return VideoResult(buf.getvalue(), meta)
