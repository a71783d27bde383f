"""MoonViT, Kimi K2.5's vision tower, and its patch-merger projector (``mm_projector``).

Einsum letters: T patches, P pixels per patch (3 x 14 x 14), D vision hidden, C the
q | k | v split, N heads, K head dim, I MLP hidden, A / B position-table rows / columns,
U the 16 bicubic taps of a patch's position, M merged tokens, G patches per merged token
(2 x 2), E / F the projector's input / hidden (both G x D), O text hidden.

Pipeline for packed media (``pixel_values`` [sum_i T_i H_i W_i, 3, p, p] in the
preprocessor's (frame, row, column) raster order, one ``(T, H, W)`` grid per medium):

1. patch embedding: the 14 x 14 stride-14 convolution as a matmul on flattened patches;
2. plus the learned position table [A, B, D] resized to each medium's (H, W) with PyTorch's
   bicubic (:func:`bicubic_taps`; height and width separately) and, for T > 1, the fixed
   sin/cos term of each frame (:func:`temporal_embedding`);
3. pre-LayerNorm blocks with fused ``wqkv``, 2-D RoPE on q and k (:func:`rope_2d`) and
   attention within each medium only (all frames of a video chunk see each other; media
   packed together never do, as in the reference's production flash-attention path);
4. ``final_layernorm``, mean over frames and 2 x 2 merge: [M, G, D] (:func:`merge_patches`);
5. projector: LayerNorm on each sub-patch, concat, Linear, exact GELU, Linear -> [M, O].

Everything that depends on the grids (each patch's medium, row, column and frame, its
bicubic taps, the patches of each merged token) is a :class:`PatchLayout` of integer and
float arrays made on the host (:func:`patch_layout`). :func:`project_media` runs the
pipeline on the exact grids (static: one program per set of grids, one attention per
medium); :func:`project_bucketed` runs the same per-patch math on media padded to a fixed
patch count (:func:`pad_media`) with the layout as traced input, so one program serves any
media of that many patches or fewer.

The parameter tree follows the checkpoint's names (``vision_tower.patch_embed.proj``,
``vision_tower.encoder.blocks.{i}.wqkv``, ``mm_projector.proj.{0,2}``, ...) with matrices
stored ``[in..., out...]``; :func:`checkpoint_tensors` maps each parameter to its checkpoint
tensor and PyTorch layout (used by the converter and :func:`vision_params_from_checkpoint_tree`).

Logical axes: ``vision_patch`` (P), ``vision_pos_h`` / ``vision_pos_w`` (A / B),
``vision_embed`` (D), ``vision_qkv`` (C), ``vision_heads`` (N), ``vision_head_dim`` (K),
``vision_mlp`` (I), ``mm_merged`` / ``mm_hidden`` (E / F), ``embed`` (O, the decoder's
hidden size) and ``norm`` for LayerNorm scales and biases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from kimi_jax.config.model import Fields, UnsupportedConfigError, is_int
from kimi_jax.media.tokens import num_media_tokens
from kimi_jax.model.layers import apply_rope, weight

Grid = tuple[int, int, int]
Array = np.ndarray | jax.Array
BICUBIC_A = -0.75
ROPE_THETA = 10000.0
LAYER_NORM_EPS = 1e-5  # the tower's LayerNorms (fixed in the reference code, not in the config)
TEMPORAL_BASE = 10000.0


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ``vision_config`` block of a K2.5 ``config.json`` (Moonshot's key names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    pos_emb_height: int
    pos_emb_width: int
    pos_emb_time: int
    merge_kernel_size: tuple[int, int]
    mm_hidden_size: int
    text_hidden_size: int
    projector_ln_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Pixels per patch: 3 x patch_size x patch_size."""
        return 3 * self.patch_size * self.patch_size

    @property
    def merged_size(self) -> int:
        """Width of one merged token: the projector's input and hidden size."""
        kh, kw = self.merge_kernel_size
        return self.mm_hidden_size * kh * kw

    def num_tokens(self, grid: Sequence[int]) -> int:
        """Decoder tokens of one medium (a video chunk is pooled over its frames)."""
        return num_media_tokens(grid, self.merge_kernel_size)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VisionConfig:
        """Reads Moonshot's ``vision_config``; unsupported values (wrong types included) raise
        UnsupportedConfigError naming the key.

        ``_attn_implementation`` is ignored: attention always stays within each medium.
        """
        f = Fields(d, "vision_config.")

        def require(key: str, supported: Sequence[Any]) -> None:
            if key in d and d[key] not in supported:
                raise UnsupportedConfigError(
                    f"config: vision_config.{key}={d[key]!r} is not supported (only {', '.join(map(repr, supported))})"
                )

        require("pos_emb_type", ["divided_fixed"])
        require("merge_type", ["sd2_tpool"])
        require("mm_projector_type", ["patchmerger"])
        require("projector_hidden_act", ["gelu"])
        require("video_attn_type", ["spatial_temporal"])
        kernel = f.raw("merge_kernel_size")
        kernel = (kernel, kernel) if is_int(kernel) else kernel
        if not isinstance(kernel, (list, tuple)) or len(kernel) != 2 or not all(is_int(k) and k >= 1 for k in kernel):
            raise UnsupportedConfigError(
                f"config: vision_config.merge_kernel_size={kernel!r} must be two positive ints"
            )
        cfg = cls(
            hidden_size=f.int("vt_hidden_size"),
            num_hidden_layers=f.int("vt_num_hidden_layers"),
            num_attention_heads=f.int("vt_num_attention_heads"),
            intermediate_size=f.int("vt_intermediate_size"),
            patch_size=f.int("patch_size"),
            pos_emb_height=f.int("init_pos_emb_height"),
            pos_emb_width=f.int("init_pos_emb_width"),
            pos_emb_time=f.int("init_pos_emb_time"),
            merge_kernel_size=tuple(kernel),
            mm_hidden_size=f.int("mm_hidden_size"),
            text_hidden_size=f.int("text_hidden_size"),
            projector_ln_eps=f.number("projector_ln_eps", 1e-5, positive=True),
        )
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise UnsupportedConfigError(
                f"config: vision_config.vt_hidden_size={cfg.hidden_size} over vt_num_attention_heads="
                f"{cfg.num_attention_heads} must give a head dim divisible by 4 (2-D RoPE)"
            )
        if cfg.mm_hidden_size != cfg.hidden_size:
            raise UnsupportedConfigError(
                f"config: vision_config.mm_hidden_size={cfg.mm_hidden_size} must equal "
                f"vt_hidden_size={cfg.hidden_size} (the projector normalizes the tower's output)"
            )
        return cfg


def as_grids(grid_thws: Any, cfg: VisionConfig) -> tuple[Grid, ...]:
    """``grid_thws`` ([M, 3] array, or a sequence of (T, H, W)) as a hashable tuple of ints.

    The grids fix every shape of the computation, so they must be concrete (static under
    ``jit``), not traced.
    """
    if isinstance(grid_thws, jax.core.Tracer):
        raise TypeError("grid_thws must be concrete (a numpy array or a tuple of ints), not a traced array")
    g = np.asarray(grid_thws)
    if g.ndim != 2 or g.shape[1] != 3 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"grid_thws must be integers of shape [M, 3], got {g.dtype} {g.shape}")
    kh, kw = cfg.merge_kernel_size
    for t, h, w in g.tolist():
        if min(t, h, w) < 1 or h % kh or w % kw:
            raise ValueError(f"grid (T, H, W)={(t, h, w)} must be positive with H, W divisible by {kh}, {kw}")
        if t > cfg.pos_emb_time:
            raise ValueError(f"grid (T, H, W)={(t, h, w)} has more frames than init_pos_emb_time={cfg.pos_emb_time}")
    return tuple((int(t), int(h), int(w)) for t, h, w in g.tolist())


# ---------------------------------------------------------------- fixed tables (numpy)


def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The source rows [out, 4] (int64) and weights [out, 4] (float64) of PyTorch's 1-D
    bicubic resize (``F.interpolate``, a = -0.75, align_corners=False, no antialias).

    Output ``i`` samples source coordinate ``(i + 0.5) * in / out - 0.5`` (not clamped
    at 0, unlike the linear modes) with the 4 cubic-convolution taps around it; taps
    beyond the edges are clamped to the border row (a row can then appear twice). Weights
    are computed in float64; PyTorch's float32 kernel differs from them by its own rounding
    (about 1e-6 for a 64-row table).
    """
    a = BICUBIC_A
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    index = np.floor(src).astype(np.int64)
    t = src - index

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    return np.clip(index[:, None] + np.arange(-1, 3), 0, in_size - 1), weights


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32: :func:`bicubic_taps` as the matrix that resizes a column."""
    taps, weights = bicubic_taps(in_size, out_size)
    out = np.zeros((out_size, in_size))
    np.add.at(out, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return out.astype(np.float32)


def temporal_embedding(num_frames: int, dim: int) -> np.ndarray:
    """[num_frames, dim] float32 sin/cos term of frames 0..num_frames-1 (MAE's 1-D form:
    ``[sin(f * w_j), cos(f * w_j)]`` with ``w_j = 10000^(-2j / dim)``, computed in float64)."""
    omega = 1.0 / TEMPORAL_BASE ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.arange(num_frames, dtype=np.float64)[:, None] * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def rope_2d(y: Array, x: Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim/2] (float32) of patches at rows ``y`` and columns ``x`` [T]
    of their media.

    Pair ``2j`` of the head rotates with the column (x) at frequency ``theta^(-4j/K)``,
    pair ``2j + 1`` with the row (y) at the same frequency.
    """
    freqs = 1.0 / ROPE_THETA ** (jnp.arange(0, head_dim, 4, dtype=jnp.float32) / head_dim)
    x, y = jnp.asarray(x).astype(jnp.float32), jnp.asarray(y).astype(jnp.float32)
    angles = jnp.stack([x[:, None] * freqs, y[:, None] * freqs], axis=-1).reshape(-1, head_dim // 2)
    return jnp.cos(angles), jnp.sin(angles)


# ------------------------------------------------------------- patch layout (numpy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PatchLayout:
    """Where the patches and merged tokens of packed media sit (:func:`patch_layout`).

    Patches past the media (padding) form one more medium of their own, at row and column
    0 with no position term; merged tokens past the media average nothing (zeros).
    """

    medium: Array  # [T] int32: the medium of each patch (padding: the number of media)
    row: Array  # [T] int32: the patch's row in its medium
    col: Array  # [T] int32: the patch's column
    frame: Array  # [T] int32: its row of the temporal table (the frame if T > 1, else the zero row)
    pos_taps: Array  # [T, U] int32: the rows of the flattened position table its resize reads
    pos_weights: Array  # [T, U] float32: their bicubic weights
    merge: Array  # [M, frames, G] int32: the patch of each frame and sub-patch of a merged token
    merge_frames: Array  # [M] int32: the frames a merged token averages (0: padding)


def patch_layout(grids: Sequence[Grid], cfg: VisionConfig, bucket: int | None = None) -> PatchLayout:
    """The :class:`PatchLayout` of media ``grids`` packed in order: exactly their patches,
    tokens and most frames, or with ``bucket`` padded to ``bucket`` patches,
    ``bucket // G`` merged tokens and ``cfg.pos_emb_time`` frames (sizes that depend on the
    bucket only)."""
    kh, kw = cfg.merge_kernel_size
    A, B = cfg.pos_emb_height, cfg.pos_emb_width
    n = sum(t * h * w for t, h, w in grids)
    tokens = sum((h // kh) * (w // kw) for _, h, w in grids)
    frames = max((t for t, _, _ in grids), default=1)
    if bucket is not None:
        if n > bucket:
            raise ValueError(f"media of {n} patches (grids {list(grids)}) do not fit a bucket of {bucket} patches")
        n, tokens, frames = bucket, bucket // (kh * kw), cfg.pos_emb_time
    medium = np.full(n, len(grids), np.int32)
    row, col = np.zeros(n, np.int32), np.zeros(n, np.int32)
    frame = np.full(n, cfg.pos_emb_time, np.int32)
    pos_taps, pos_weights = np.zeros((n, 16), np.int32), np.zeros((n, 16), np.float32)
    merge, merge_frames = np.zeros((tokens, frames, kh * kw), np.int32), np.zeros(tokens, np.int32)
    start = token = 0
    for i, (t, h, w) in enumerate(grids):
        patches = np.s_[start : start + t * h * w]
        flat = np.arange(t * h * w)
        y, x = flat % (h * w) // w, flat % w
        medium[patches], row[patches], col[patches] = i, y, x
        if t > 1:
            frame[patches] = flat // (h * w)
        (rows, row_w), (cols, col_w) = bicubic_taps(A, h), bicubic_taps(B, w)
        pos_taps[patches] = (rows[y][:, :, None] * B + cols[x][:, None, :]).reshape(-1, 16)
        pos_weights[patches] = (row_w[y][:, :, None] * col_w[x][:, None, :]).reshape(-1, 16)
        # merged token (r, c) averages frames f of its kh x kw block (dy, dx), row-major
        r, c, f, dy, dx = np.ix_(np.arange(h // kh), np.arange(w // kw), np.arange(t), np.arange(kh), np.arange(kw))
        m = (h // kh) * (w // kw)
        merge[token : token + m, :t] = (start + f * h * w + (r * kh + dy) * w + c * kw + dx).reshape(m, t, kh * kw)
        merge_frames[token : token + m] = t
        start, token = start + t * h * w, token + m
    return PatchLayout(medium, row, col, frame, pos_taps, pos_weights, merge, merge_frames)


def check_pixel_values(shape: Sequence[int], grids: Sequence[Grid], cfg: VisionConfig) -> None:
    """ValueError unless ``pixel_values`` of ``shape`` hold the patches of media ``grids``."""
    n = sum(t * h * w for t, h, w in grids)
    if tuple(shape) != (n, 3, cfg.patch_size, cfg.patch_size):
        raise ValueError(
            f"pixel_values has shape {tuple(shape)}; grid_thws {list(grids)} need "
            f"{(n, 3, cfg.patch_size, cfg.patch_size)}"
        )


def pad_media(
    pixel_values: Any, grids: Sequence[Grid], cfg: VisionConfig, bucket: int
) -> tuple[np.ndarray, PatchLayout]:
    """The inputs of :func:`project_bucketed` for media ``grids`` (their packed
    ``pixel_values``) in a bucket of ``bucket`` patches: the pixels zero-padded to
    [bucket, 3, p, p] float32, and their :func:`patch_layout`."""
    check_pixel_values(np.shape(pixel_values), grids, cfg)
    layout = patch_layout(grids, cfg, bucket)
    pixels = np.zeros((bucket, 3, cfg.patch_size, cfg.patch_size), np.float32)
    pixels[: len(pixel_values)] = pixel_values
    return pixels, layout


# ---------------------------------------------------------------------------- modules


class Affine(nnx.Module):
    """A weight stored ``[in..., out...]`` and a bias ``[out...]``: PyTorch's ``Linear``."""

    def __init__(self, rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], n_in: int, dtype: jnp.dtype):
        self.weight = weight(rngs, shape, axes, dtype)
        self.bias = weight(rngs, shape[n_in:], axes[n_in:], dtype, init="zeros")

    def __call__(self, spec: str, x: jax.Array) -> jax.Array:
        """``einsum(spec, x, weight) + bias``."""
        return jnp.einsum(spec, x, self.weight[...]) + self.bias[...]


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias; statistics and affine in float32, cast back."""

    def __init__(self, rngs: nnx.Rngs, dim: int, eps: float, dtype: jnp.dtype):
        self.eps = eps
        self.weight = weight(rngs, (dim,), ("norm",), dtype, init="ones")
        self.bias = weight(rngs, (dim,), ("norm",), dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class PositionTable(nnx.Module):
    """The learned position table [A, B, D] (``patch_embed.pos_emb.weight``)."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.cfg = cfg
        self.weight = weight(
            rngs, (cfg.pos_emb_height, cfg.pos_emb_width, cfg.hidden_size),
            ("vision_pos_h", "vision_pos_w", "vision_embed"), dtype,
        )

    def __call__(self, grid: Grid) -> jax.Array:
        """Position terms [T*H*W, D] (float32) of one medium (:meth:`embed`)."""
        return self.embed(patch_layout([grid], self.cfg))

    def embed(self, layout: PatchLayout) -> jax.Array:
        """Position terms [T, D] (float32) of the patches of ``layout``: the table resized
        bicubically to each medium's (H, W), plus each frame's temporal term when T > 1."""
        table = self.weight[...].astype(jnp.float32)
        A, B, D = table.shape
        taps = table.reshape(A * B, D)[layout.pos_taps]
        pos = jnp.einsum("tu,tud->td", layout.pos_weights, taps, precision=jax.lax.Precision.HIGHEST)
        temporal = np.concatenate([temporal_embedding(self.cfg.pos_emb_time, D), np.zeros((1, D), np.float32)])
        return pos + jnp.asarray(temporal)[layout.frame]


class PatchEmbed(nnx.Module):
    """``proj`` (the 14 x 14 stride-14 convolution, as a matmul) and ``pos_emb``."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.proj = Affine(rngs, (cfg.patch_dim, cfg.hidden_size), ("vision_patch", "vision_embed"), 1, dtype)
        self.pos_emb = PositionTable(cfg, rngs, dtype)


class VisionMLP(nnx.Module):
    """``fc1(gelu_tanh(fc0(x)))``."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs, dtype: jnp.dtype):
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.fc0 = Affine(rngs, (D, I), ("vision_embed", "vision_mlp"), 1, dtype)
        self.fc1 = Affine(rngs, (I, D), ("vision_mlp", "vision_embed"), 1, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc1("ti,id->td", jax.nn.gelu(self.fc0("td,di->ti", x), approximate=True))


class EncoderBlock(nnx.Module):
    """``x += wo(attn(norm0(x))); x += mlp(norm1(x))`` with attention within each medium."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs, dtype: jnp.dtype, attention_impl: str | None):
        D, N, K = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.scale = K**-0.5
        self.attention_impl = attention_impl
        self.norm0 = LayerNorm(rngs, D, LAYER_NORM_EPS, dtype)
        self.wqkv = Affine(
            rngs, (D, 3, N, K), ("vision_embed", "vision_qkv", "vision_heads", "vision_head_dim"), 1, dtype
        )
        self.wo = Affine(rngs, (N, K, D), ("vision_heads", "vision_head_dim", "vision_embed"), 2, dtype)
        self.norm1 = LayerNorm(rngs, D, LAYER_NORM_EPS, dtype)
        self.mlp = VisionMLP(cfg, rngs, dtype)

    def attention(self, x: jax.Array, cos: jax.Array, sin: jax.Array, media: tuple[int, ...] | jax.Array) -> jax.Array:
        """Self-attention of ``x`` [T, D] within each medium. ``media`` is each medium's patch
        count (a tuple: one attention per medium, over its slice of the patches) or each
        patch's medium [T] (an array: one attention over all patches, masked to pairs in the
        same medium; cuDNN takes the mask as an additive [T, T] bias). Returns [T, D]."""
        qkv = self.wqkv("td,dcnk->tcnk", x)
        q = apply_rope(qkv[:, 0], cos[:, None], sin[:, None])
        k = apply_rope(qkv[:, 1], cos[:, None], sin[:, None])
        v = qkv[:, 2]

        def attend(q, k, v, mask=None):
            return jax.nn.dot_product_attention(
                q[None], k[None], v[None], mask=mask, scale=self.scale, implementation=self.attention_impl
            )[0]

        if isinstance(media, tuple):
            bounds = np.cumsum((0,) + media)
            out = jnp.concatenate([attend(q[a:b], k[a:b], v[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        else:
            out = attend(q, k, v, (media[:, None] == media[None, :])[None, None])
        return self.wo("tnk,nkd->td", out)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, media: tuple[int, ...] | jax.Array) -> jax.Array:
        x = x + self.attention(self.norm0(x), cos, sin, media)
        return x + self.mlp(self.norm1(x))


class Encoder(nnx.Module):
    """``blocks`` and ``final_layernorm``."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs, dtype: jnp.dtype, attention_impl: str | None):
        self.blocks = nnx.List(
            [EncoderBlock(cfg, rngs, dtype, attention_impl) for _ in range(cfg.num_hidden_layers)]
        )
        self.final_layernorm = LayerNorm(rngs, cfg.hidden_size, LAYER_NORM_EPS, dtype)


def merge_patches(x: jax.Array, layout: PatchLayout) -> jax.Array:
    """[T, D] -> [M, G, D]: each merged token of ``layout`` is its kh x kw block of patches
    (row-major within the block), each patch averaged over its medium's frames (float32)."""
    frames = jnp.asarray(layout.merge_frames)
    patches = x.astype(jnp.float32)[layout.merge]  # [M, frames, G, D]
    used = jnp.arange(patches.shape[1]) < frames[:, None]
    total = jnp.where(used[:, :, None, None], patches, 0.0).sum(axis=1)
    return (total / jnp.maximum(frames, 1).astype(jnp.float32)[:, None, None]).astype(x.dtype)


class VisionTower(nnx.Module):
    """``vision_tower``: patch embedding, encoder blocks and final LayerNorm."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs, dtype: jnp.dtype, attention_impl: str | None):
        if attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl={attention_impl!r}; choose None, 'xla' or 'cudnn'")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs, dtype)
        self.encoder = Encoder(cfg, rngs, dtype, attention_impl)

    def __call__(
        self, pixel_values: jax.Array, layout: PatchLayout, media: tuple[int, ...] | jax.Array,
        named: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Patches [T, 3, p, p] placed by ``layout``, attending within ``media`` (see
        :meth:`EncoderBlock.attention`) -> ``final_layernorm`` output [T, D]. Records
        ``patch_proj_out``, ``patch_embed_out`` and ``block{i}_out`` into ``named`` when given."""
        named = {} if named is None else named
        proj = self.patch_embed.proj
        dtype = proj.weight.dtype
        x = proj("tp,pd->td", pixel_values.reshape(pixel_values.shape[0], -1).astype(dtype))
        named["patch_proj_out"] = x
        x = x + self.patch_embed.pos_emb.embed(layout).astype(dtype)
        named["patch_embed_out"] = x
        cos, sin = rope_2d(layout.row, layout.col, self.cfg.head_dim)
        for i, block in enumerate(self.encoder.blocks):
            with jax.named_scope(f"vision_block{i}"):
                x = block(x, cos, sin, media)
            named[f"block{i}_out"] = x
        return self.encoder.final_layernorm(x)


class Gelu(nnx.Module):
    """Exact (erf) GELU: the parameter-free ``proj.1`` of the projector."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=False)


class Projector(nnx.Module):
    """``mm_projector``: ``pre_norm`` on each sub-patch, concat, ``proj.0``, exact GELU, ``proj.2``."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs, dtype: jnp.dtype):
        E, O = cfg.merged_size, cfg.text_hidden_size
        self.pre_norm = LayerNorm(rngs, cfg.mm_hidden_size, cfg.projector_ln_eps, dtype)
        self.proj = nnx.List([
            Affine(rngs, (E, E), ("mm_merged", "mm_hidden"), 1, dtype),
            Gelu(),
            Affine(rngs, (E, O), ("mm_hidden", "embed"), 1, dtype),
        ])

    def __call__(self, merged: jax.Array) -> jax.Array:
        """[M, G, D] -> [M, O]."""
        x = self.pre_norm(merged).reshape(merged.shape[0], -1)
        x = self.proj[1](self.proj[0]("me,ef->mf", x))
        return self.proj[2]("mf,fo->mo", x)


class MoonViT(nnx.Module):
    """The vision model: ``vision_tower`` and ``mm_projector``, named as in the checkpoint.

    ``model(pixel_values, grid_thws)`` -> [M, O] decoder embeddings of the packed media, in
    media order (``cfg.num_tokens(grid)`` rows each). ``grid_thws`` must be concrete: a
    numpy array, or under ``jit`` a static tuple of (T, H, W) tuples (:func:`as_grids`);
    :func:`encode_media` is the jitted entry point.

    ``attention_impl`` is ``jax.nn.dot_product_attention``'s ``implementation``: ``None``
    (XLA, any backend; materializes [N, n, n] float32 scores per medium) or ``"cudnn"``
    (cuDNN flash attention; NVIDIA GPUs, bfloat16 / float16 only). On one H200, the real
    config in bfloat16 encodes a 16384-patch image in 620 ms with ``None`` and 139 ms with
    ``"cudnn"``. :func:`project_bucketed` uses either with a mask that keeps each medium to
    itself (cuDNN adds it as a [B, B] bias).
    """

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs | None = None,
        attention_impl: str | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg, rngs, jnp.dtype(dtype), attention_impl)
        self.mm_projector = Projector(cfg, rngs, jnp.dtype(dtype))

    def __call__(
        self, pixel_values: jax.Array, grid_thws: Any, *, intermediates: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Projected features [M, O]; with ``intermediates=True`` also a dict of
        ``patch_proj_out``, ``patch_embed_out``, ``block{i}_out``, ``final_layernorm_out``
        [sum T*H*W, D], ``merged`` [M, G, D] and ``projected`` [M, O]."""
        named: dict[str, jax.Array] | None = {} if intermediates else None
        projected = project_media(
            self.vision_tower, self.mm_projector, pixel_values, as_grids(grid_thws, self.cfg), named
        )
        return projected if named is None else (projected, named)


def project_media(
    tower: VisionTower,
    projector: Projector,
    pixel_values: jax.Array,
    grids: Sequence[Grid],
    named: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """The whole vision pipeline: packed patches of the media ``grids`` -> decoder embeddings
    [M, O] in media order. Records the stages (see :meth:`MoonViT.__call__`) into ``named``."""
    check_pixel_values(pixel_values.shape, grids, tower.cfg)
    lengths = tuple(t * h * w for t, h, w in grids)
    return _project(tower, projector, jnp.asarray(pixel_values), patch_layout(grids, tower.cfg), lengths, named)


def project_bucketed(
    tower: VisionTower, projector: Projector, pixel_values: jax.Array, layout: PatchLayout
) -> jax.Array:
    """:func:`project_media` of media padded to a bucket of B patches (:func:`pad_media`:
    ``pixel_values`` [B, 3, p, p] and their ``layout``) -> [B // G, O], of which the first M
    rows are the media's decoder embeddings (M: their merged tokens) and the rest padding.

    Shapes depend on B only, so under ``jit`` one program serves all media of B patches or
    fewer. Attention is one masked attention over the B patches (memory grows as B^2 with
    XLA: [N, B, B] float32 scores).
    """
    layout = jax.tree.map(jnp.asarray, layout)
    return _project(tower, projector, jnp.asarray(pixel_values), layout, layout.medium, None)


def _project(
    tower: VisionTower, projector: Projector, pixel_values: jax.Array, layout: PatchLayout,
    media: tuple[int, ...] | jax.Array, named: dict[str, jax.Array] | None,
) -> jax.Array:
    hidden = tower(pixel_values, layout, media, named)
    merged = merge_patches(hidden, layout)
    projected = projector(merged)
    if named is not None:
        named.update(final_layernorm_out=hidden, merged=merged, projected=projected)
    return projected


def encode_media(
    model: MoonViT, pixel_values: jax.Array, grid_thws: Any, *, intermediates: bool = False
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """``model(pixel_values, grid_thws)`` compiled once per set of grids."""
    return _encode(model, jnp.asarray(pixel_values), as_grids(grid_thws, model.cfg), intermediates)


@nnx.jit(static_argnums=(2, 3))
def _encode(model: MoonViT, pixel_values: jax.Array, grids: tuple[Grid, ...], intermediates: bool):
    return model(pixel_values, grids, intermediates=intermediates)


# ------------------------------------------------------------------------ checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointTensor:
    """Where one parameter comes from in the official checkpoint.

    ``name``: the tensor's official name; ``shape``: its shape there; ``linear``: whether it
    is a PyTorch ``[out, in...]`` weight (flattened to [out, in], transposed and reshaped to
    the module's ``[in..., out...]``) rather than an array reshaped as it is.
    """

    name: str
    shape: tuple[int, ...]
    linear: bool

    def to_module_layout(self, value: Any, shape: Sequence[int]) -> Any:
        """``value`` (this tensor, numpy or jax) in the module's layout of ``shape``."""
        if self.linear:
            value = value.reshape(value.shape[0], -1).T
        return value.reshape(tuple(shape))


def checkpoint_tensors(cfg: VisionConfig) -> dict[tuple, CheckpointTensor]:
    """Every parameter of ``vision_tower`` / ``mm_projector`` (by its path in the pure state
    dict, list indices as ints) and the checkpoint tensor it is read from.

    The name is the path joined with dots. Weights of rank >= 2 with a bias beside them are
    linear: the convolution's [D, 3, p, p] -> [P, D], ``wqkv`` [3D, D] -> [D, 3, N, K],
    ``wo`` [D, D] -> [N, K, D], the others [out, in] -> [in, out]. Everything else keeps its
    values in order: biases are stored flat (``wqkv.bias`` [3D] -> [3, N, K]), the position
    table and the LayerNorms as they are.
    """
    out = {}
    params = nnx.state(nnx.eval_shape(lambda: MoonViT(cfg, dtype=jnp.float32))).to_pure_dict()
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        name = ".".join(map(str, path))
        bias = flat.get(path[:-1] + ("bias",))
        if path[-1] == "weight" and bias is not None and len(shape) >= 2:
            n_out = int(np.prod(bias.shape))
            if path[:3] == ("vision_tower", "patch_embed", "proj"):
                source = (n_out, 3, cfg.patch_size, cfg.patch_size)
            else:
                source = (n_out, int(np.prod(shape)) // n_out)
            out[path] = CheckpointTensor(name, source, True)
        elif path[-1] == "bias":
            out[path] = CheckpointTensor(name, (int(np.prod(shape)),), False)
        else:
            out[path] = CheckpointTensor(name, shape, False)
    return out


def vision_params_from_checkpoint_tree(tree: dict, cfg: VisionConfig) -> dict:
    """The checkpoint's ``vision_tower`` / ``mm_projector`` subtrees (official names split at
    the dots, string indices, PyTorch layouts) -> the pure state dict of :class:`MoonViT`
    (``nnx.state(model).to_pure_dict()`` layout), per :func:`checkpoint_tensors`.

    For loading the tower on its own from raw safetensors; ``kimi_jax.checkpoint.convert`` writes
    converted checkpoints in the module's layout already. Arrays keep their dtype (numpy or jax).
    """
    missing = {"vision_tower", "mm_projector"} - set(tree)
    if missing:
        raise KeyError(f"checkpoint tree has no {sorted(missing)} subtree")
    tensors = checkpoint_tensors(cfg)
    target = nnx.state(nnx.eval_shape(lambda: MoonViT(cfg, dtype=jnp.float32))).to_pure_dict()

    def convert(src: Any, tgt: Any, path: tuple) -> Any:
        if not isinstance(tgt, dict):
            tensor = tensors[path]
            if tuple(src.shape) != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {tensor.name} has shape {tuple(src.shape)}, which does not fit "
                    f"the config (expected {tensor.shape})"
                )
            return tensor.to_module_layout(src, tgt.shape)
        keys = {str(k): k for k in tgt}
        if not isinstance(src, dict) or set(src) != set(keys):
            found = set(src) if isinstance(src, dict) else set()
            extra, absent = sorted(found - set(keys)), sorted(set(keys) - found)
            raise KeyError(f"checkpoint tree at {'.'.join(map(str, path)) or '<root>'}: unexpected {extra}, "
                           f"missing {absent}")
        return {keys[k]: convert(v, tgt[keys[k]], path + (keys[k],)) for k, v in src.items()}

    return convert({k: tree[k] for k in ("vision_tower", "mm_projector")}, target, ())
