"""The media of prompts: placeholder expansion, and images / video chunks taken from chat messages.

In K2.5 prompts each medium (an image or one video chunk) is written
``<|media_begin|>image<|media_content|><|media_pad|><|media_end|>`` (``video`` for a chunk, which
the prompt also prefixes with its timestamp). Moonshot's processor leaves that single
``<|media_pad|>`` per medium in the token ids and its model expands it; the decoder needs one
``<|media_pad|>`` per merged vision token, ``(H / 2) * (W / 2)`` for a grid ``(T, H, W)``
(:func:`expand_media_placeholders`). A *run* of consecutive placeholders is one medium, so
media must be separated by other tokens, as the chat template always does.

Chat messages carry media as content parts (see :func:`conversation_media`); the chat
template writes an image part as the placeholder above and a video part as
``<|kimi_k25_video_placeholder|>``, which :func:`insert_video_chunks` replaces with the
prompts of the video's chunks, as Moonshot's processor does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kimi_jax.chat.special import VIDEO_PLACEHOLDER
from kimi_jax.media.preprocess import (
    PreprocessConfig,
    VideoChunk,
    preprocess_media,
    split_video_chunks,
)
from kimi_jax.media.tokens import num_media_tokens
from kimi_jax.media.video import is_video_source, load_video

# ------------------------------------------------------------------------- placeholders


def placeholder_runs(ids: np.ndarray, placeholder_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive ``placeholder_id`` in the 1-D ``ids``."""
    is_pad = np.concatenate([[False], np.asarray(ids) == placeholder_id, [False]])
    edges = np.flatnonzero(is_pad[1:] != is_pad[:-1])
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def expand_media_placeholders(
    input_ids: Any,
    grid_thws: Any,
    *,
    placeholder_id: int,
    merge_kernel_size: int | Sequence[int] = 2,
) -> np.ndarray | list[np.ndarray]:
    """Token ids with each medium's ``<|media_pad|>`` run expanded to the medium's token count.

    ``input_ids`` is one sequence (1-D) or several (a list of sequences or a [B, T] array);
    ``grid_thws`` [M, 3] are the media of all of them in order, one per run of placeholders.
    A run of one placeholder (as Moonshot's processor writes it) becomes
    ``num_media_tokens(grid)`` placeholders; a run that already has that length is kept, so
    expanded ids pass through unchanged. Returns an int32 array for one sequence, else a
    list of them (rows grow by different amounts). Raises ``ValueError`` when the runs and
    the media do not match.
    """
    counts = num_media_tokens(np.asarray(grid_thws, np.int64).reshape(-1, 3), merge_kernel_size).tolist()
    if hasattr(input_ids, "ndim"):
        single = input_ids.ndim == 1
    else:
        single = not input_ids or isinstance(input_ids[0], int | np.integer)
    rows = [np.asarray(input_ids)] if single else [np.asarray(r) for r in input_ids]
    runs = [placeholder_runs(ids, placeholder_id) for ids in rows]
    if sum(map(len, runs)) != len(counts):
        raise ValueError(
            f"input_ids hold {sum(map(len, runs))} runs of media placeholders (id {placeholder_id}), one per "
            f"medium, but grid_thws has {len(counts)} media"
        )
    out, used = [], 0
    for b, (ids, row_runs) in enumerate(zip(rows, runs)):
        pieces, pos = [], 0
        for start, length in row_runs:
            n = counts[used]
            if length not in (1, n):
                raise ValueError(
                    f"sequence {b}: a run of {length} media placeholders at position {start} for medium "
                    f"{used}, which takes {n} tokens (write one placeholder per medium, or {n})"
                )
            pieces += [ids[pos:start], np.full(n, placeholder_id, ids.dtype)]
            pos, used = start + length, used + 1
        out.append(np.concatenate(pieces + [ids[pos:]]).astype(np.int32))
    return out[0] if single else out


def check_expanded(placeholders: int, grid_thws: Any, merge_kernel_size: int | Sequence[int] = 2) -> None:
    """Raises ``ValueError`` unless ``placeholders`` (the ``<|media_pad|>`` tokens of a batch)
    is the total token count of the media of ``grid_thws``."""
    counts = num_media_tokens(np.asarray(grid_thws, np.int64).reshape(-1, 3), merge_kernel_size).tolist()
    if placeholders != sum(counts):
        raise ValueError(
            f"input_ids hold {placeholders} media placeholders, but the {len(counts)} media of grid_thws "
            f"take {sum(counts)} tokens ({', '.join(map(str, counts))}): give each medium one placeholder "
            "per token (expand_media_placeholders expands the one placeholder per medium that Moonshot's "
            "processor and the chat template write)"
        )


# ----------------------------------------------------------------------- chat messages


def conversation_media(messages: Sequence[Mapping[str, Any]], cfg: PreprocessConfig | None = None) -> list[Any]:
    """The media of a conversation's content parts, in prompt order: for each image part its
    image (as ``load_image`` takes it), for each video part its list of :class:`VideoChunk`.

    Image parts: ``{"type": "image", "image" | "url" | "path": X}`` with X a file path, a
    ``file://`` or base64 ``data:`` URL, bytes, a PIL image or an HxWx3 uint8 array; or
    OpenAI-style ``{"type": "image_url", "image_url": {"url": X}}`` (or ``"image_url": X``).
    Video parts: ``{"type": "video", "video": chunks}`` with the chunks of
    :func:`~kimi_jax.media.preprocess.split_video_chunks`, ``{"type": "video",
    "video": frames, "fps": fps}`` with every decoded frame of the video (split here), or
    ``{"type": "video", "video": FILE}`` with FILE a video file's path (or ``file://`` URL),
    bytes or a base64 ``data:`` URL, decoded and sampled by :func:`kimi_jax.media.video.load_video`
    with ``cfg`` (default: K2.5's); optional part fields ``"start"`` / ``"end"`` (seconds, default
    the whole video) and ``"max_frames"`` (default
    :data:`~kimi_jax.media.video.DEFAULT_MAX_FRAMES`; ``None`` for no cap).
    Remote URLs and ``video_url`` parts raise ``ValueError``: fetch them and pass a ``video`` part.
    """
    media = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list | tuple):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            where = f"message {i}, part {j} ({kind})"
            if kind in ("image", "image_url"):
                media.append(_image_source(part, where))
            elif kind == "video":
                media.append(_video_chunks(part, where, cfg))
            elif kind == "video_url":
                raise ValueError(
                    f"{where}: video_url parts are not read; pass encoded videos as "
                    "{'type': 'video', 'video': PATH or data: URL}"
                )
    return media


def _image_source(part: Mapping[str, Any], where: str) -> Any:
    if part["type"] == "image_url":
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, Mapping) else value
    else:
        value = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if value is None or isinstance(value, list | tuple):
        raise ValueError(f"{where}: no image given (expected an 'image', 'url' or 'path' key, or image_url.url)")
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            raise ValueError(f"{where}: remote image {value[:80]!r} is not fetched; download it and pass the path")
        value = value.removeprefix("file://")
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _video_chunks(part: Mapping[str, Any], where: str, cfg: PreprocessConfig | None = None) -> list[VideoChunk]:
    video = part.get("video")
    if video is None:
        raise ValueError(f"{where}: no 'video' key")
    if isinstance(video, list | tuple) and video and all(isinstance(c, VideoChunk) for c in video):
        return list(video)
    if is_video_source(video):
        options = {k: part[k] for k in ("start", "end", "max_frames") if k in part}
        try:
            return load_video(video, cfg, **options)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if part.get("fps") is None:
        raise ValueError(
            f"{where}: give the video as split_video_chunks(...) chunks, or as its frames with an 'fps' key"
        )
    try:
        return split_video_chunks(video, part["fps"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def insert_video_chunks(text: str, media: Sequence[Any]) -> str:
    """``text`` with the i-th ``<|kimi_k25_video_placeholder|>`` replaced by the chunk prompts
    (timestamp + one-placeholder medium) of the i-th video of ``media``."""
    videos = [m for m in media if isinstance(m, list)]
    pieces = text.split(VIDEO_PLACEHOLDER)
    if len(pieces) - 1 != len(videos):
        raise ValueError(f"the prompt has {len(pieces) - 1} video placeholders for {len(videos)} video parts")
    out = [pieces[0]]
    for chunks, piece in zip(videos, pieces[1:]):
        out += ["".join(c.prompt for c in chunks), piece]
    return "".join(out)


def preprocess_conversation_media(media: Sequence[Any], cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """``pixel_values`` [N, 3, p, p] and ``grid_thws`` [M, 3] of :func:`conversation_media`'s
    output, one medium per image and per video chunk."""
    items = [c for m in media for c in (m if isinstance(m, list) else [m])]
    return preprocess_media(items, cfg)
