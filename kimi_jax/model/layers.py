"""Building blocks shared by the model files: weight declaration, RMSNorm, YaRN RoPE.

Every weight is declared once through :func:`weight`, which records its logical axis names
as the ``axes`` metadata of the ``nnx.Param``. The sharding rules (``kimi_jax.parallel.layout``)
map those names to mesh axes; the model code never names a mesh axis.

Logical axes: ``vocab``, ``embed`` (D), ``q_lora``, ``kv_lora`` (C), ``kv_a`` (C + R),
``heads`` (N), ``qk_head`` (nope + rope), ``kv_head`` (nope + v), ``v_head``, ``mlp``
(dense and shared-expert hidden), ``expert`` (E), ``expert_mlp`` (F), ``router`` (the
router's expert dimension), ``norm`` for RMSNorm scales, and ``batch`` for activations and
the KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.config.model import TextConfig, yarn_mscale
from kimi_jax.kernels.stacked_matmul import fits as stacked_fits
from kimi_jax.kernels.stacked_matmul import stacked_matmul, stacked_matmuls


class Buffer(nnx.Variable):
    """A checkpoint array that is not trained (the router's correction bias)."""


class Quantized(nnx.Variable):
    """Quantized weights (INT4 values and their scales): stored and used, never trained, so
    optimizers and gradients that select ``nnx.Param`` leave them alone."""


def weight(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str],
    dtype: jnp.dtype,
    *,
    init: str = "normal",
    std: float = 0.02,
    kind: type[nnx.Variable] = nnx.Param,
) -> nnx.Variable:
    """Declares one weight: its shape, logical axes, dtype and initializer."""
    shape, axes = tuple(shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"weight of shape {shape} declared with axes {axes}")
    if init == "normal":
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown initializer {init!r}")
    return kind(value, axes=axes)


def project(spec: str, x: jax.Array, w: jax.Array, layer: jax.Array | None = None, *,
            out_dtype: jnp.dtype | None = None, interpret: bool = False) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` for a projection that contracts x's last axes with w's first
    ones, in order (``"btd,dq->btq"``, ``"...d,df->...f"``).

    ``w`` may be a run's whole stack ``[L, *w's axes]`` (one more axis than ``spec`` names;
    ``TextModel`` passes the big projections of a cached step so): layer ``layer`` of it is
    used, read in place on NVIDIA GPUs by ``kimi_jax.kernels.stacked_matmul`` where it takes
    the shapes (a decode step's few rows), sliced out elsewhere. ``out_dtype=jnp.float32``
    gives float32 results of float32 products (``x`` and ``w`` taken to float32, as the
    router's reference; the kernel's bf16 products are exact in float32 and summed in it);
    default: x's dtype. ``interpret=True`` runs the kernel in Pallas' interpreter on any
    platform (tests).
    """
    w_axes = spec.split("->")[0].split(",")[1]
    full = out_dtype is not None and jnp.dtype(out_dtype) == jnp.float32

    def einsum(x, w):
        if not full:
            return jnp.einsum(spec, x, w)
        return jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

    if w.ndim == len(w_axes):
        return einsum(x, w)

    def sliced(x, w, layer):
        return einsum(x, layer_of(w, layer))

    n = sum(c in w_axes for c in spec.split(",")[0])  # contracted axes
    M, K, N = math.prod(x.shape[:-n]), math.prod(x.shape[-n:]), math.prod(w.shape[1 + n:])

    def in_place(x, w, layer):
        y = stacked_matmul(x.reshape(M, K), w.reshape(w.shape[0], K, N), layer, out_dtype=out_dtype,
                           interpret=interpret)
        return y.reshape(*x.shape[:-n], *w.shape[1 + n:])

    return in_place_or_sliced(x, w, layer, sliced, in_place, fits=stacked_fits(M, K, N) and x.dtype == w.dtype,
                              interpret=interpret)


def projections(x: jax.Array, ws: Sequence[jax.Array], layer: jax.Array | None = None, *,
                out_dtypes: Sequence[jnp.dtype | None] | None = None, interpret: bool = False) -> tuple[jax.Array, ...]:
    """``project("...d,dn->...n", x, w, layer, out_dtype=...)`` for each weight of ``ws`` (each
    [D, N_i], or a run's stack of them): projections of one input. Read in place they are one
    launch of ``kimi_jax.kernels.stacked_matmul.stacked_matmuls`` (NVIDIA GPUs, where it takes
    the shapes); elsewhere each is :func:`project`'s."""
    out_dtypes = tuple(out_dtypes) if out_dtypes is not None else (None,) * len(ws)

    def each(x, ws, layer):
        return tuple(project("...d,dn->...n", x, w, layer, out_dtype=d) for w, d in zip(ws, out_dtypes, strict=True))

    if layer is None or ws[0].ndim == 2:
        return each(x, ws, layer)
    M, K = math.prod(x.shape[:-1]), x.shape[-1]

    def in_place(x, ws, layer):
        ys = stacked_matmuls(x.reshape(M, K), ws, layer, out_dtypes=out_dtypes, interpret=interpret)
        return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys)

    def sliced(x, ws, layer):
        return each(x, tuple(layer_of(w, layer) for w in ws), None)

    fits = all(stacked_fits(M, K, w.shape[-1]) and w.dtype == x.dtype and w.ndim == 3 for w in ws)
    return in_place_or_sliced(x, tuple(ws), layer, sliced, in_place, fits=fits, interpret=interpret)


def layer_of(w: jax.Array, layer: jax.Array) -> jax.Array:
    """Layer ``layer`` of a run's stack ``w`` [L, ...], sliced out (a copy on GPUs)."""
    return jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)


def in_place_or_sliced(x: jax.Array, w: jax.Array, layer: jax.Array, sliced, in_place, *, fits: bool,
                       interpret: bool = False) -> jax.Array:
    """``in_place(x, w, layer)``, a kernel reading layer ``layer`` of the stack ``w`` in place, on
    NVIDIA GPUs where it ``fits`` (anywhere, in Pallas' interpreter, with ``interpret``); else
    ``sliced(x, w, layer)``, XLA on the layer sliced out."""
    if not fits:
        return sliced(x, w, layer)
    if interpret:
        return in_place(x, w, layer)
    return jax.lax.platform_dependent(x, w, layer, cuda=in_place, default=sliced)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as the reference: statistics in float32, cast back, then times the weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


def yarn_inv_freq(cfg: TextConfig) -> np.ndarray:
    """Inverse RoPE frequencies [rope_dim / 2], float32, computed in the reference's order."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponent = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    extra = (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)
    y = cfg.rope_scaling
    if y is None:
        return extra
    inter = (np.float32(1.0) / (np.float32(y.factor) * np.float32(base) ** exponent)).astype(np.float32)
    low, high = yarn_correction_range(cfg)
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    keep = (np.float32(1.0) - ramp).astype(np.float32)
    return (inter * (np.float32(1.0) - keep) + extra * keep).astype(np.float32)


def yarn_correction_range(cfg: TextConfig) -> tuple[float, float]:
    """YaRN's ramp bounds (low, high) over the rope dimension pairs."""
    y = cfg.rope_scaling
    assert y is not None
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta

    def dim_for(rotations: float) -> float:
        return d * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for(y.beta_fast)), 0)
    high = min(math.ceil(dim_for(y.beta_slow)), d - 1)
    if low == high:
        high += 0.001
    return low, high


def rope_attention_factor(cfg: TextConfig) -> float:
    """The factor YaRN multiplies cos and sin by (1 for Kimi K2.5)."""
    y = cfg.rope_scaling
    if y is None:
        return 1.0
    return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)


def rope_table(positions: jax.Array, inv_freq: jax.Array, factor: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., rope_dim / 2] in float32 for integer ``positions`` [...]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent pairs (2i, 2i+1) of the last axis by angle i (the checkpoint's layout).

    ``cos`` / ``sin`` broadcast against ``x`` without its last axis, e.g. [B, T, 1, R/2]
    for per-head queries [B, T, N, R].
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
