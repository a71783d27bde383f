"""Video files -> K2.5 video chunks, decoded with PyAV (FFmpeg).

The reference processor (``KimiK25VisionProcessor.split_video_chunks``) reads a video's frame
count ``n`` and average frame rate ``fps``, keeps the frames
``np.linspace(0, n - 1, k).round()`` with ``k = max(round(n * min(sample_fps, fps) / fps), 1)``
(:func:`~kimi_jax.media.preprocess.sample_video_frames`), groups them in chunks of
``temporal_merge_kernel_size`` and writes each chunk's start as ``index / fps`` in
``timestamp_mode`` (``hh:mm:ss.fff``). Here the same indices count the frames in presentation
order, so a variable-frame-rate video keeps the frames the reference keeps; each chunk also
records its frames' real presentation times (``VideoChunk.frame_times``, seconds from the first
frame).

Reading is seek-based: the packets are demuxed once (no decoding) to learn every frame's
presentation time and the key frames; then only the sampled frames are decoded, each from the
key frame before it (or onward from the previous sampled frame when no key frame lies between).

Two options the reference lacks, with defaults that keep its behaviour:

* ``start`` / ``end`` (seconds from the first frame): a time range; the frames shown in
  ``[start, end)`` are sampled as a video of their own, and timestamps stay those of the whole
  video. Default: the whole video.
* ``max_frames``: at most this many frames are sampled (default :data:`DEFAULT_MAX_FRAMES`,
  512 = 128 chunks of 4, at most 131072 tokens at K2.5's per-frame budget of 4096 patches,
  half its context). A video whose sampling at ``sample_fps`` needs more (longer than 256 s at
  2 fps) gets ``max_frames`` frames spread evenly over it by the same ``linspace`` rule, and a
  warning says how it was sampled. ``None`` removes the cap. ``max_num_frames_each_video`` of the
  preprocessor config, when set, caps it too.

Bad input (missing, unreadable, empty or non-video files, no video stream, no frames, a codec
FFmpeg cannot decode, corrupt data, a range outside the video) raises ``ValueError`` naming the file.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from kimi_jax.media.preprocess import (
    PreprocessConfig,
    VideoChunk,
    decode_data_url,
    sample_video_frames,
    timestamp_as_str,
    video_chunk_resize_plan,
)

__all__ = ["DEFAULT_MAX_FRAMES", "VideoInfo", "probe_video", "check_video_range", "load_video",
           "is_video_source"]

DEFAULT_MAX_FRAMES = 512
"""Frames sampled from one video at most, unless the caller says otherwise (see the module doc)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns from a video without decoding it (but its first frame)."""

    name: str                        # how errors name the video, e.g. "'clip.mp4'"
    codec: str
    width: int
    height: int
    fps: float                       # the stream's average frame rate, as the reference reads it
    duration: float                  # seconds, from the first frame to the end of the last
    frame_times: tuple[float, ...]   # every frame's presentation time, seconds from the first
    pts: tuple[int, ...]             # every frame's presentation timestamp, in time_base units
    keyframe_pts: tuple[int, ...]    # the key frames' presentation timestamps
    time_base: float

    @property
    def num_frames(self) -> int:
        return len(self.frame_times)


def is_video_source(x: Any) -> bool:
    """Whether ``x`` is something :func:`load_video` reads: a path, bytes, or a ``data:`` URL."""
    return isinstance(x, str | os.PathLike | bytes | bytearray | memoryview)


# ------------------------------------------------------------------------------ opening


def _source(x: Any) -> tuple[Any, str]:
    """What ``av.open`` takes for ``x``, and how errors name it."""
    if isinstance(x, bytes | bytearray | memoryview):
        data = bytes(x)
        if not data:
            raise ValueError("cannot read video <0 bytes>: it is empty")
        return io.BytesIO(data), f"<{len(data)} bytes>"
    if not isinstance(x, str | os.PathLike):
        raise ValueError(
            f"unsupported video input of type {type(x).__name__}: expected a file path, bytes or a data: URL"
        )
    s = os.fspath(x)
    if isinstance(s, bytes):
        s = s.decode()
    if s.startswith("data:"):
        data, name = decode_data_url(s, "video")
        if not data:
            raise ValueError(f"cannot read video {name}: it is empty")
        return io.BytesIO(data), name
    if s.startswith(("http://", "https://")):
        raise ValueError(f"remote video {s[:80]!r} is not fetched; download it and pass the path")
    s = s.removeprefix("file://")
    name = repr(s)
    if not os.path.exists(s):
        raise ValueError(f"cannot read video {name}: file does not exist")
    if os.path.isdir(s):
        raise ValueError(f"cannot read video {name}: is a directory")
    if not os.access(s, os.R_OK):
        raise ValueError(f"cannot read video {name}: permission denied")
    if os.path.getsize(s) == 0:
        raise ValueError(f"cannot read video {name}: the file is empty")
    return s, name


def _open(src: Any, name: str):
    import av  # imported where videos are decoded: the rest of kimi_jax works without it
    if isinstance(src, io.BytesIO):
        src.seek(0)
    try:
        container = av.open(src, "r")
    except av.error.InvalidDataError:
        raise ValueError(
            f"cannot read video {name}: not a video format FFmpeg can read, or corrupt or truncated data"
        ) from None
    except av.error.EOFError:
        raise ValueError(f"cannot read video {name}: it ends before any frame (empty or truncated)") from None
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"cannot read video {name}: {e}") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"cannot read video {name}: the file has no video stream")
    return container, container.streams.video[0]


def _decoder_check(stream, name: str) -> str:
    ctx = stream.codec_context
    codec = getattr(ctx, "name", None) or "unknown"
    if getattr(ctx, "codec", None) is None or codec in ("none", "unknown"):
        raise ValueError(f"cannot read video {name}: unsupported codec (FFmpeg has no decoder for it)")
    return codec


def _probe(container, stream, name: str) -> VideoInfo:
    import av  # imported where videos are decoded: the rest of kimi_jax works without it
    codec = _decoder_check(stream, name)
    tb = float(stream.time_base) if stream.time_base else None
    packets = []  # (pts, duration, keyframe)
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # the flush packet; frames an edit list drops
                continue
            packets.append((packet.pts, packet.duration or 0, packet.is_keyframe))
    except av.error.FFmpegError as e:
        if not packets:
            raise ValueError(f"cannot read video {name}: corrupt data ({e})") from None
        log.warning("video %s: demuxing stopped after %d frames (%s); using those", name, len(packets), e)
    if not packets:
        raise ValueError(f"cannot read video {name}: it has no frames (zero length)")
    if tb is None or any(p[0] is None for p in packets):
        raise ValueError(f"cannot read video {name}: its frames carry no presentation times")
    packets.sort(key=lambda p: p[0])
    pts = [p[0] for p in packets]
    first = pts[0]
    frame_times = tuple((p - first) * tb for p in pts)
    keyframes = tuple(sorted(p[0] for p in packets if p[2])) or (first,)

    fps = 0.0
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and float(rate) > 0 and math.isfinite(float(rate)):
            fps = float(rate)
            break
    last_duration = packets[-1][1] * tb
    span = frame_times[-1]
    if not fps > 0:
        if span <= 0:
            raise ValueError(f"cannot read video {name}: no frame rate and a single frame time")
        fps = (len(pts) - 1) / span
    duration = span + (last_duration if last_duration > 0 else 1.0 / fps)

    width, height = stream.codec_context.width, stream.codec_context.height
    if not (width and height and width > 0 and height > 0):
        raise ValueError(f"cannot read video {name}: no frame size in the stream")
    return VideoInfo(name, codec, int(width), int(height), fps, duration, frame_times, tuple(pts), keyframes,
                     tb)


def probe_video(source: Any) -> VideoInfo:
    """Opens ``source`` (a path, bytes or a base64 ``data:`` URL), demuxes its video stream's
    packets (no decoding) and decodes its first frame, so unreadable files, unsupported codecs
    and corrupt data fail here. Raises ``ValueError`` naming the file."""
    src, name = _source(source)
    container, stream = _open(src, name)
    with container:
        info = _probe(container, stream, name)
        _decode_at(container, stream, info, [0])
    return info


def check_video_range(info: VideoInfo, start: float | None = None, end: float | None = None
                      ) -> tuple[int, int]:
    """The frames ``[a, b)`` shown in ``[start, end)`` seconds; ``ValueError`` if the range is
    not inside the video."""
    for what, v in (("start", start), ("end", end)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise ValueError(f"video {info.name}: {what} must be a number of seconds, got {v!r}")
    lo = 0.0 if start is None else float(start)
    hi = info.duration if end is None else float(end)
    span = f"the video lasts {info.duration:.3f} s"
    if lo < 0:
        raise ValueError(f"video {info.name}: start {lo} s is negative")
    if lo >= info.duration:
        raise ValueError(f"video {info.name}: start {lo} s is outside the video ({span})")
    if hi <= lo:
        raise ValueError(f"video {info.name}: end {hi} s is not after start {lo} s")
    if hi > info.duration + 1e-6:
        raise ValueError(f"video {info.name}: end {hi} s is outside the video ({span})")
    a = bisect.bisect_left(info.frame_times, lo - 1e-9)
    b = bisect.bisect_left(info.frame_times, hi - 1e-9)
    if b <= a:
        raise ValueError(f"video {info.name}: no frame is shown in [{lo}, {hi}) s")
    return a, b


# ----------------------------------------------------------------------------- decoding


def _decode_at(container, stream, info: VideoInfo, indices: list[int]) -> dict[int, np.ndarray]:
    """RGB uint8 frames (the first decoded frame's size) at the given frame indices."""
    import av  # imported where videos are decoded: the rest of kimi_jax works without it
    first = info.pts[0]
    key_pts = list(info.keyframe_pts)
    out: dict[int, np.ndarray] = {}
    frames = None
    last = None  # pts of the last decoded frame
    size = None
    for index in sorted(set(indices)):
        target = info.pts[index]
        k = bisect.bisect_right(key_pts, target) - 1
        for attempt in range(3):
            if frames is None or last is None or last >= target or (k >= 0 and key_pts[k] > last):
                seek_to = key_pts[max(k, 0)] if attempt == 0 else (key_pts[0] if attempt == 1 else first)
                try:
                    container.seek(seek_to, stream=stream, backward=True, any_frame=False)
                except av.error.FFmpegError as e:
                    raise ValueError(f"cannot read video {info.name}: seek failed ({e})") from None
                frames, last, fresh = container.decode(stream), None, True
            else:
                fresh = False
            got = None
            try:
                for frame in frames:
                    p = frame.pts
                    if p is None:
                        continue
                    if fresh and last is None and p > target and attempt < 2:
                        break  # the seek overshot: go back further
                    last = p
                    if p >= target:
                        got = frame
                        break
            except av.error.FFmpegError as e:
                raise ValueError(f"cannot read video {info.name}: corrupt data ({e})") from None
            if got is not None:
                break
            frames = None  # overshot or ran out: seek again from further back
        if got is None:
            raise ValueError(f"cannot read video {info.name}: frame {index} could not be decoded")
        if size is None:
            size = (got.width, got.height)
        try:
            out[index] = got.to_ndarray(format="rgb24", width=size[0], height=size[1])
        except (av.error.FFmpegError, ValueError) as e:
            raise ValueError(f"cannot read video {info.name}: cannot convert frame {index} to RGB ({e})") from None
    return out


def _pre_resize(frames: list[np.ndarray], cfg: PreprocessConfig) -> list[Any]:
    """The chunk's frames resized now, where that is exactly what ``preprocess_video_chunk`` would
    do (its plan for the resized size keeps that size), so long videos hold small frames."""
    h, w = frames[0].shape[:2]
    plan = video_chunk_resize_plan(w, h, len(frames), cfg)
    size = (plan.new_width, plan.new_height)
    if size == (w, h):
        return frames
    again = video_chunk_resize_plan(size[0], size[1], len(frames), cfg)
    if (again.new_width, again.new_height) != size:
        return frames
    return [np.asarray(Image.fromarray(f).resize(size, resample=Image.Resampling.BICUBIC)) for f in frames]


def load_video(source: Any, cfg: PreprocessConfig | None = None, *, start: float | None = None,
               end: float | None = None, max_frames: int | None = DEFAULT_MAX_FRAMES) -> list[VideoChunk]:
    """A video file (path, bytes or base64 ``data:`` URL) as the reference's chunks.

    Frames are sampled as the reference does (see the module doc), within ``[start, end)``
    seconds and at most ``max_frames`` of them; chunk timestamps are ``frame_index / fps``.
    The chunks feed ``preprocess_media`` / chat ``video`` parts like split_video_chunks' do.
    """
    cfg = cfg if cfg is not None else PreprocessConfig()
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int | np.integer)
                                   or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    src, name = _source(source)
    container, stream = _open(src, name)
    with container:
        info = _probe(container, stream, name)
        a, b = check_video_range(info, start, end)
        n = b - a
        cap = cfg.max_num_frames_each_video
        if max_frames is not None:
            cap = max_frames if cap is None else min(cap, int(max_frames))
        wanted = sample_video_frames(n, info.fps, dataclasses.replace(cfg, max_num_frames_each_video=None))
        picked = sample_video_frames(n, info.fps, dataclasses.replace(cfg, max_num_frames_each_video=cap))
        indices = [a + i for i in picked]
        if len(picked) < len(wanted):
            seconds = info.frame_times[b - 1] - info.frame_times[a] + 1.0 / info.fps
            log.warning(
                "video %s: %.1f s would take %d frames at %g fps; sampled %d frames evenly instead "
                "(one every %.2f s), the frame limit (max_frames, --video-max-frames)",
                name, seconds, len(wanted), min(cfg.sample_fps, info.fps), len(picked),
                seconds / len(picked))
        decoded = _decode_at(container, stream, info, indices)
    k = cfg.temporal_merge_kernel_size
    chunks = []
    for i in range(0, len(indices), k):
        idx = tuple(indices[i:i + k])
        stamp = idx[0] / info.fps
        chunks.append(VideoChunk(
            frames=tuple(_pre_resize([decoded[j] for j in idx], cfg)),
            frame_indices=idx,
            timestamp=stamp,
            timestamp_text=timestamp_as_str(stamp, cfg.timestamp_mode),
            frame_times=tuple(info.frame_times[j] for j in idx),
        ))
    return chunks
