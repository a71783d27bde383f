"""Kimi K2.5 media preprocessing (images and video chunks), in Pillow + numpy.

This reproduces Moonshot's reference processor (``KimiK25VisionProcessor`` and its
``media_utils``, Hugging Face revision 3367c8d) bit for bit:

* RGB via ``PIL.Image.convert("RGB")`` (alpha is dropped, not composited);
* NaViT resize: ``scale = min(1, sqrt(in_patch_limit / (max(1, w // 14) * max(1, h // 14))),
  512 * 14 / w, 512 * 14 / h)``, new size ``max(1, int(side * scale))`` capped at
  ``512 * 14`` (never upscales);
* Pillow bicubic resize (``Image.resize(..., Image.Resampling.BICUBIC)``);
* zero padding at the bottom and right up to multiples of ``patch_size * merge_kernel_size``
  (28), done on the uint8 pixels, so padded pixels normalise to ``-1``;
* ``(x / 255.0).astype(float32)``, then ``- mean`` and ``* (1 / std)`` (the reference's exact
  arithmetic, so the float32 results are identical);
* patches ``[T * H/14 * W/14, 3, 14, 14]`` in (t, row, column) raster order,
  ``grid_thw = (T, H/14, W/14)``.

Video: the reference samples ``round(n_frames * min(sample_fps, fps) / fps)`` frames
(``np.linspace(0, n - 1, k).round()``), groups them in chunks of ``temporal_merge_kernel_size``
(4) and emits each chunk as one medium, prefixed in the prompt by the chunk's start time
(``hh:mm:ss.fff``). A chunk uses the per-frame patch budget ``in_patch_limit_each_frame``
(4096). The vision tower pools a chunk over time, so a chunk of any T costs
``(H/28) * (W/28)`` tokens, like one image of that size.

The helpers here work on already decoded frames; ``kimi_jax.media.video`` reads video files.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from kimi_jax.config.model import builtin_config_dir
from kimi_jax.media.tokens import num_media_tokens

__all__ = [
    "PreprocessConfig",
    "ResizePlan",
    "VideoChunk",
    "load_image",
    "resize_size",
    "resize_plan",
    "video_chunk_resize_plan",
    "preprocess_image",
    "preprocess_video_chunk",
    "preprocess_media",
    "sample_video_frames",
    "split_video_chunks",
    "timestamp_as_str",
    "chunk_prompt",
    "num_media_tokens",
    "patchify",
    "normalize",
]


_TIMESTAMP_MODES = ("hh:mm:ss.fff", "mm:ss.fff", "mm:ss")


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    """The ``media_proc_cfg`` block of ``preprocessor_config.json``.

    Defaults are those of the released Kimi K2.5 checkpoint.
    """

    in_patch_limit: int = 16384
    patch_size: int = 14
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    merge_kernel_size: int = 2
    fixed_output_tokens: int | None = None
    patch_limit_on_one_side: int = 512
    in_patch_limit_each_frame: int | None = 4096
    in_patch_limit_video: int | None = None
    sample_fps: float = 2.0
    max_num_frames_each_video: int | None = None
    temporal_merge_kernel_size: int = 4
    timestamp_mode: str = "hh:mm:ss.fff"

    def __post_init__(self) -> None:
        def positive_int(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"PreprocessConfig.{name} must be a positive integer, got {v!r}")

        for name in ("in_patch_limit", "patch_size", "merge_kernel_size",
                     "patch_limit_on_one_side", "temporal_merge_kernel_size"):
            positive_int(name)
        for name in ("fixed_output_tokens", "in_patch_limit_each_frame",
                     "in_patch_limit_video", "max_num_frames_each_video"):
            positive_int(name, optional=True)
        for name in ("image_mean", "image_std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3:
                raise ValueError(f"PreprocessConfig.{name} must have 3 values, got {v!r}")
            object.__setattr__(self, name, v)
        if any(s == 0.0 for s in self.image_std):
            raise ValueError(f"PreprocessConfig.image_std must be nonzero, got {self.image_std!r}")
        if not (self.sample_fps > 0):
            raise ValueError(f"PreprocessConfig.sample_fps must be > 0, got {self.sample_fps!r}")
        if self.timestamp_mode not in _TIMESTAMP_MODES:
            raise ValueError(
                f"PreprocessConfig.timestamp_mode must be one of {_TIMESTAMP_MODES}, "
                f"got {self.timestamp_mode!r}"
            )

    @property
    def pad_multiple(self) -> int:
        """Side lengths are padded to multiples of this (patch_size * merge_kernel_size)."""
        return self.patch_size * self.merge_kernel_size

    @property
    def frame_patch_limit(self) -> int:
        """Patch budget of one frame of a video chunk (reference fallback: in_patch_limit)."""
        if self.in_patch_limit_each_frame is None:
            return self.in_patch_limit
        return self.in_patch_limit_each_frame

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        """Build from a whole ``preprocessor_config.json`` dict or its ``media_proc_cfg`` block.

        Missing keys keep the defaults; bookkeeping keys (``config_type``, ``auto_map``...)
        are ignored.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"preprocessor config must be a mapping, got {type(d).__name__}")
        block = d.get("media_proc_cfg", d)
        if not isinstance(block, Mapping):
            raise ValueError("preprocessor config: 'media_proc_cfg' must be a mapping")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in block:
                continue
            v = block[f.name]
            if f.name == "merge_kernel_size" and isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    raise ValueError(f"non-square merge_kernel_size {v!r} is not supported")
                v = v[0]
            if f.name in ("image_mean", "image_std") and v is not None:
                v = tuple(v)
            if f.name == "sample_fps" and v is not None:
                v = float(v)
            if v is None and f.default is not None:
                continue  # explicit null for a required field: keep the default
            kwargs[f.name] = v
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PreprocessConfig":
        """Read ``preprocessor_config.json`` (or a JSON file holding just the block)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "preprocessor_config.json")
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except FileNotFoundError:
            raise ValueError(f"preprocessor config {path!r}: file does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"preprocessor config {path!r}: invalid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def default(cls) -> "PreprocessConfig":
        """K2.5's own ``preprocessor_config.json``, shipped with the package."""
        return cls.from_file(builtin_config_dir("kimi-k2.5") / "preprocessor_config.json")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d


def _cfg(cfg: PreprocessConfig | Mapping[str, Any] | None) -> PreprocessConfig:
    if cfg is None:
        return PreprocessConfig()
    if isinstance(cfg, PreprocessConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return PreprocessConfig.from_dict(cfg)
    raise ValueError(f"expected a PreprocessConfig or a dict, got {type(cfg).__name__}")


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def decode_data_url(url: str, kind: str) -> tuple[bytes, str]:
    """The bytes of a base64 ``data:`` URL and how errors name it; ``ValueError`` naming the
    ``kind`` of medium (image, video) for anything else."""
    head, sep, payload = url.partition(",")
    name = f"data URL {head[:40]!r}"
    if not sep or ";base64" not in head:
        raise ValueError(f"cannot read {kind} {name}: expected a base64 payload")
    try:
        return base64.b64decode(payload, validate=True), name
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"cannot read {kind} {name}: bad base64 ({e})") from None


def _open_pil(fp: Any, what: str) -> Image.Image:
    try:
        img = Image.open(fp)
        img.load()  # Image.open is lazy: force decoding so truncated files fail here
    except UnidentifiedImageError:
        raise ValueError(
            f"cannot read image {what}: not an image format Pillow can decode "
            "(videos must be decoded into frames first)"
        ) from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image {what}: too many pixels for Pillow ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ValueError(f"cannot read image {what}: corrupt or truncated data ({e})") from None
    return img


def load_image(x: Any) -> Image.Image:
    """Return an RGB ``PIL.Image`` from a file path, bytes, a ``data:`` URL, a PIL image or an
    ``HxWx3`` (or ``HxW`` grayscale) uint8 array.

    Conversion is ``Image.convert("RGB")`` as in the reference (an alpha channel is dropped).
    Unreadable or unsupported inputs raise ``ValueError`` naming the input and the reason.
    """
    if isinstance(x, Image.Image):
        img = x
        what = f"<PIL.Image mode={x.mode} size={x.size}>"
    elif isinstance(x, (str, os.PathLike)):
        s = os.fspath(x)
        if isinstance(s, bytes):
            s = s.decode()
        if s.startswith("data:"):
            raw, name = decode_data_url(s, "image")
            img = _open_pil(io.BytesIO(raw), name)
            what = "data URL"
        else:
            if not os.path.exists(s):
                raise ValueError(f"cannot read image {s!r}: file does not exist")
            if os.path.isdir(s):
                raise ValueError(f"cannot read image {s!r}: is a directory")
            img = _open_pil(s, repr(s))
            what = repr(s)
    elif isinstance(x, (bytes, bytearray, memoryview)):
        img = _open_pil(io.BytesIO(bytes(x)), f"<{len(x)} bytes>")
        what = f"<{len(x)} bytes>"
    elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ValueError(
                f"cannot use array of dtype {x.dtype} and shape {x.shape} as an image: "
                "expected uint8 pixels in [0, 255]"
            )
        if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
            raise ValueError(
                f"cannot use array of shape {x.shape} as an image: expected HxWx3 (RGB) or HxW"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"cannot use array of shape {x.shape} as an image: it is empty")
        img = Image.fromarray(np.ascontiguousarray(x))
        what = f"<array {x.shape}>"
    else:
        raise ValueError(
            f"unsupported image input of type {type(x).__name__}: expected a path, bytes, "
            "a PIL image or an HxWx3 uint8 array"
        )
    if img.width <= 0 or img.height <= 0:
        raise ValueError(f"cannot use image {what}: empty size {img.size}")
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot convert image {what} (mode {img.mode}) to RGB: {e}") from None


# --------------------------------------------------------------------------------------
# Resize arithmetic
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResizePlan:
    """The reference's resize config for one medium (same fields as its dict)."""

    num_tokens: int
    new_width: int
    new_height: int
    pad_width: int
    pad_height: int
    sampled_nframes: int = 1

    @property
    def padded_width(self) -> int:
        return self.new_width + self.pad_width

    @property
    def padded_height(self) -> int:
        return self.new_height + self.pad_height

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _navit_resize(width: int, height: int, patch_size: int, merge_kernel_size: int,
                  in_patch_limit: int, patch_limit_on_one_side: int,
                  fixed_output_tokens: int | None) -> ResizePlan:
    if isinstance(width, bool) or isinstance(height, bool):
        raise ValueError(f"image size must be integers, got {width!r} x {height!r}")
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    # Same float arithmetic as the reference, in the same order.
    s1 = math.sqrt(in_patch_limit / (max(1.0, width // patch_size) * max(1.0, height // patch_size)))
    s2 = patch_limit_on_one_side * patch_size / width
    s3 = patch_limit_on_one_side * patch_size / height
    scale = min(1.0, s1, s2, s3)
    max_side = patch_limit_on_one_side * patch_size
    new_w = min(max(1, int(width * scale)), max_side)
    new_h = min(max(1, int(height * scale)), max_side)

    factor = merge_kernel_size * patch_size
    pad_h = (factor - new_h % factor) % factor
    pad_w = (factor - new_w % factor) % factor

    if fixed_output_tokens is not None:
        num_tokens = fixed_output_tokens
    else:
        token_h = (new_h + pad_h) // factor
        token_w = (new_w + pad_w) // factor
        if token_h * merge_kernel_size > patch_limit_on_one_side or \
                token_w * merge_kernel_size > patch_limit_on_one_side:
            raise ValueError(
                f"resize of {width}x{height} gives a {token_w * merge_kernel_size}x"
                f"{token_h * merge_kernel_size} patch grid, over patch_limit_on_one_side="
                f"{patch_limit_on_one_side}"
            )
        num_tokens = token_h * token_w
    return ResizePlan(num_tokens, new_w, new_h, pad_w, pad_h, 1)


def resize_plan(width: int, height: int, cfg: PreprocessConfig | None = None) -> ResizePlan:
    """Resize config of an image of ``width`` x ``height`` (reference ``navit_resize_image``)."""
    cfg = _cfg(cfg)
    return _navit_resize(width, height, cfg.patch_size, cfg.merge_kernel_size,
                         cfg.in_patch_limit, cfg.patch_limit_on_one_side,
                         cfg.fixed_output_tokens)


def video_chunk_resize_plan(width: int, height: int, nframes: int,
                            cfg: PreprocessConfig | None = None) -> ResizePlan:
    """Resize config of a video chunk of ``nframes`` frames of ``width`` x ``height``.

    The reference treats a chunk as a video at 1 fps sampled at infinite fps, so every frame
    is kept, and applies the per-frame budget (``in_patch_limit_each_frame``, further capped
    by ``in_patch_limit_video / nframes`` when that is set).
    """
    cfg = _cfg(cfg)
    nframes = int(nframes)
    if nframes <= 0:
        raise ValueError(f"a video chunk needs at least one frame, got {nframes}")
    # real_sample_fps_and_max_num_frames("video_chunk"): sample_fps=inf, no frame cap;
    # navit_resize_video with avg_fps=1.0.
    avg_fps = 1.0
    sample_fps = min(math.inf, avg_fps)
    sampled_nframes = max(round(nframes * sample_fps / avg_fps), 1)
    limit = cfg.frame_patch_limit
    if cfg.in_patch_limit_video is not None:
        limit = min(round(cfg.in_patch_limit_video / sampled_nframes), limit)
    plan = _navit_resize(width, height, cfg.patch_size, cfg.merge_kernel_size, limit,
                         cfg.patch_limit_on_one_side, cfg.fixed_output_tokens)
    return dataclasses.replace(plan, sampled_nframes=sampled_nframes)


def resize_size(width: int, height: int, cfg: PreprocessConfig | None = None, *,
                video: bool = False) -> tuple[int, int]:
    """Target ``(new_width, new_height)`` before padding, exactly as the reference computes it.

    Never upscales. ``video=True`` uses the per-frame budget of a video chunk.
    """
    plan = video_chunk_resize_plan(width, height, 1, cfg) if video else resize_plan(width, height, cfg)
    return plan.new_width, plan.new_height


# --------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------


def _resize_and_pad(img: Image.Image, plan: ResizePlan) -> np.ndarray:
    """Pillow bicubic resize to the plan's size, then zero-pad bottom/right: HxWx3 uint8."""
    if img.size != (plan.new_width, plan.new_height):
        img = img.resize((plan.new_width, plan.new_height), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    if plan.pad_height or plan.pad_width:
        arr = np.pad(arr, ((0, plan.pad_height), (0, plan.pad_width), (0, 0)),
                     mode="constant", constant_values=0)
    return arr


def normalize(pixels: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """uint8 ``(..., 3)`` pixels -> float32, with the reference's exact arithmetic."""
    cfg = _cfg(cfg)
    mean = np.array(cfg.image_mean)             # float64, as in the reference
    std_inv = 1.0 / np.array(cfg.image_std)     # float64
    x = (pixels / 255.0).astype(np.float32)
    x -= mean
    x *= std_inv
    return x


def patchify(pixels: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(T, H, W, C)`` -> patches ``(T*H/p*W/p, C, p, p)`` in (t, row, col) order, grid_thw."""
    t, h, w, c = pixels.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"pixel size {h}x{w} is not a multiple of patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    patches = pixels.reshape(t, gh, patch_size, gw, patch_size, c)
    patches = patches.transpose(0, 1, 3, 5, 2, 4).reshape(-1, c, patch_size, patch_size)
    return np.ascontiguousarray(patches), np.array([t, gh, gw], dtype=np.int64)


def preprocess_image(image: Any, cfg: PreprocessConfig | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One image -> ``(pixel_values [N, 3, p, p] float32, grid_thw int64 (1, H/p, W/p))``."""
    cfg = _cfg(cfg)
    img = load_image(image)
    plan = resize_plan(img.width, img.height, cfg)
    arr = _resize_and_pad(img, plan)[None]
    return patchify(normalize(arr, cfg), cfg.patch_size)


def _frames_list(frames: Any) -> list[Any]:
    if isinstance(frames, np.ndarray):
        if frames.ndim == 4:
            return list(frames)
        raise ValueError(
            f"video frames array must be TxHxWx3, got shape {frames.shape}"
        )
    if isinstance(frames, (str, bytes, os.PathLike, Image.Image)):
        raise ValueError("a video chunk must be a sequence of frames, not a single image")
    try:
        return list(frames)
    except TypeError:
        raise ValueError(
            f"a video chunk must be a sequence of frames, got {type(frames).__name__}"
        ) from None


def preprocess_video_chunk(frames: Any, cfg: PreprocessConfig | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """A chunk of 1..``temporal_merge_kernel_size`` frames (paths, PIL images, HxWx3 uint8
    arrays, or one TxHxWx3 array) -> ``(pixel_values [T*H/p*W/p, 3, p, p], grid_thw (T, H/p, W/p))``.

    All frames must share one size; the resize plan uses the per-frame patch budget.
    """
    cfg = _cfg(cfg)
    if isinstance(frames, VideoChunk):
        frames = frames.frames
    imgs = [load_image(f) for f in _frames_list(frames)]
    if not imgs:
        raise ValueError("a video chunk needs at least one frame, got none")
    if len(imgs) > cfg.temporal_merge_kernel_size:
        raise ValueError(
            f"a video chunk holds at most temporal_merge_kernel_size="
            f"{cfg.temporal_merge_kernel_size} frames, got {len(imgs)}; split the video with "
            "split_video_chunks"
        )
    sizes = {im.size for im in imgs}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video chunk must have the same size, got {sorted(sizes)}")
    w, h = imgs[0].size
    plan = video_chunk_resize_plan(w, h, len(imgs), cfg)
    arr = np.stack([_resize_and_pad(im, plan) for im in imgs], axis=0)
    return patchify(normalize(arr, cfg), cfg.patch_size)


# --------------------------------------------------------------------------------------
# Video sampling and chunking
# --------------------------------------------------------------------------------------


def timestamp_as_str(timestamp: float, timestamp_mode: str = "hh:mm:ss.fff") -> str:
    """Seconds -> the reference's timestamp text, e.g. ``00:01:02.500``."""
    if not (timestamp >= 0) or math.isinf(timestamp):
        raise ValueError(f"timestamp must be a finite number of seconds >= 0, got {timestamp!r}")
    dt = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    millis = f".{int((timestamp % 1) * 1000):03d}"
    if timestamp_mode == "hh:mm:ss.fff":
        return dt.strftime("%H:%M:%S") + millis
    if timestamp_mode == "mm:ss.fff":
        return dt.strftime("%M:%S") + millis
    if timestamp_mode == "mm:ss":
        return dt.strftime("%M:%S")
    raise ValueError(f"invalid timestamp mode {timestamp_mode!r}; expected one of {_TIMESTAMP_MODES}")


def chunk_prompt(timestamp_text: str, media_pad: str = "<|media_pad|>") -> str:
    """The prompt text the reference puts in place of one video chunk."""
    return f"{timestamp_text}<|media_begin|>video<|media_content|>{media_pad}<|media_end|>"


def sample_video_frames(num_frames: int, fps: float, cfg: PreprocessConfig | None = None
                        ) -> list[int]:
    """Indices of the frames the reference keeps from a video of ``num_frames`` at ``fps``.

    ``k = max(round(num_frames * min(sample_fps, fps) / fps), 1)`` frames, evenly spread:
    ``np.linspace(0, num_frames - 1, k).round()``.
    (``max_num_frames_each_video``, when set, caps ``k`` — the reference's
    ``navit_resize_video`` rule; it is null in the released config.)
    """
    cfg = _cfg(cfg)
    num_frames = int(num_frames)
    if num_frames <= 0:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if not (fps > 0) or math.isinf(fps):
        raise ValueError(f"video fps must be a positive finite number, got {fps!r}")
    sample_fps = min(cfg.sample_fps, fps)
    k = max(round(num_frames * sample_fps / fps), 1)
    if cfg.max_num_frames_each_video is not None:
        k = min(k, cfg.max_num_frames_each_video)
    return np.linspace(0, num_frames - 1, k).round().astype(int).tolist()


@dataclass(frozen=True, eq=False)
class VideoChunk:
    """One medium of a video: up to ``temporal_merge_kernel_size`` sampled frames."""

    frames: tuple[Any, ...]
    frame_indices: tuple[int, ...]
    timestamp: float          # seconds, start of the chunk
    timestamp_text: str       # e.g. "00:00:02.000"
    frame_times: tuple[float, ...] | None = None  # the frames' presentation times (decoded files)

    @property
    def prompt(self) -> str:
        return chunk_prompt(self.timestamp_text)


def split_video_chunks(frames: Sequence[Any], fps: float | None = None,
                       cfg: PreprocessConfig | None = None, *,
                       timestamps: Sequence[float] | None = None) -> list[VideoChunk]:
    """Sample already decoded ``frames`` (every frame of the video, in order) at ``sample_fps``
    and group them in chunks of ``temporal_merge_kernel_size``, as the reference does.

    ``fps`` is the video's average frame rate; a chunk's timestamp is
    ``first_frame_index / fps``. If ``timestamps`` (seconds, one per decoded frame) are given,
    a chunk's timestamp is the timestamp of its first frame instead, and ``fps`` defaults to
    ``(len - 1) / (timestamps[-1] - timestamps[0])``.
    """
    cfg = _cfg(cfg)
    frames = _frames_list(frames)
    n = len(frames)
    if n == 0:
        raise ValueError("a video needs at least one frame, got none")
    if timestamps is not None:
        timestamps = [float(t) for t in timestamps]
        if len(timestamps) != n:
            raise ValueError(f"got {n} frames but {len(timestamps)} timestamps")
        if any(b < a for a, b in zip(timestamps, timestamps[1:])):
            raise ValueError("frame timestamps must be non-decreasing")
        if fps is None:
            span = timestamps[-1] - timestamps[0]
            if n < 2 or span <= 0:
                raise ValueError("cannot infer fps from the timestamps; pass fps")
            fps = (n - 1) / span
    if fps is None:
        raise ValueError("split_video_chunks needs the video's fps (or per-frame timestamps)")
    inds = sample_video_frames(n, fps, cfg)
    k = cfg.temporal_merge_kernel_size
    chunks = []
    for i in range(0, len(inds), k):
        idx = tuple(inds[i:i + k])
        start = timestamps[idx[0]] if timestamps is not None else idx[0] / float(fps)
        chunks.append(VideoChunk(
            frames=tuple(frames[j] for j in idx),
            frame_indices=idx,
            timestamp=start,
            timestamp_text=timestamp_as_str(start, cfg.timestamp_mode),
        ))
    return chunks


# --------------------------------------------------------------------------------------
# Packing several media
# --------------------------------------------------------------------------------------


def _preprocess_item(item: Any, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(item, VideoChunk):
        return preprocess_video_chunk(item.frames, cfg)
    if isinstance(item, Mapping):
        kind = item.get("type")
        if kind == "image":
            if "image" not in item:
                raise ValueError("media item of type 'image' has no 'image' key")
            return preprocess_image(item["image"], cfg)
        if kind == "video_chunk":
            if "video_chunk" not in item:
                raise ValueError("media item of type 'video_chunk' has no 'video_chunk' key")
            return preprocess_video_chunk(item["video_chunk"], cfg)
        raise ValueError(
            f"unsupported media type {kind!r}: expected 'image' or 'video_chunk' "
            "(split whole videos with split_video_chunks first)"
        )
    if isinstance(item, np.ndarray) and item.ndim == 4:
        return preprocess_video_chunk(item, cfg)
    if isinstance(item, (list, tuple)):
        return preprocess_video_chunk(item, cfg)
    return preprocess_image(item, cfg)


def preprocess_media(items: Iterable[Any], cfg: PreprocessConfig | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Several media -> ``(pixel_values [sum N_i, 3, p, p] float32, grid_thws [M, 3] int64)``.

    Each item is an image (path, bytes, PIL image, HxWx3 uint8 array), a video chunk (a
    ``VideoChunk``, a list/tuple of frames, or a TxHxWx3 array), or a reference-style dict
    ``{"type": "image", "image": ...}`` / ``{"type": "video_chunk", "video_chunk": [...]}``.
    """
    cfg = _cfg(cfg)
    if isinstance(items, (str, bytes, os.PathLike, Image.Image, Mapping, VideoChunk)) or (
            isinstance(items, np.ndarray)):
        items = [items]
    pvs, grids = [], []
    for i, item in enumerate(items):
        try:
            pv, g = _preprocess_item(item, cfg)
        except ValueError as e:
            raise ValueError(f"media item {i}: {e}") from None
        pvs.append(pv)
        grids.append(g)
    p = cfg.patch_size
    if not pvs:
        return np.zeros((0, 3, p, p), np.float32), np.zeros((0, 3), np.int64)
    return np.concatenate(pvs, axis=0), np.stack(grids, axis=0)
