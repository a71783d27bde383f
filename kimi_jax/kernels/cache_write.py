"""New entries of one layer of the stacked compressed cache, written in place in one launch
(Pallas' Triton lowering).

With the latents ``c_kv`` [Bc, L, S, C] and roped keys ``k_pe`` [Bc, L, S, R] of a run's
layers, a cached step stores each new token's latent and key at ``(rows[i], layer,
positions[i, t])``. XLA lowers that scatter (``kimi_jax.model.cache.LayerCache.write``, the
reference) at one token to five kernels per layer (the in-bounds test, a read of the old entry
and an in-place update for each array): on an H100 about 8 us a K2.5 decode layer. Here one
program per new token stores both rows, nothing else is read, and positions outside ``[0, S)``
are dropped (the reference's ``mode="drop"``).

The new entries come side by side, ``[latent | key]``, as MLA's kv down projection gives them.
Optionally the kernel also makes them what the cache holds from that projection
(``kimi_jax.model.mla.MLA._latents_from``): the latent's RMSNorm (``norm=(scale, eps)``, the
roundings of ``kimi_jax.model.layers.rms_norm``) and the key's rotation (``rope=(cos, sin)``,
``kimi_jax.model.layers.apply_rope``'s adjacent pairs), which XLA runs as three more launches.

The cache arrays are aliased to the outputs: the update is in place when they are donated (as a
decode step's cache is, and a scan's carry). C and R must be powers of two >= 16 (a Triton
block each); the Triton lowering uses 64-bit element offsets for operands over 4 GiB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas API; absent in some jax builds.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


def fits(latent: int, rope: int) -> bool:
    """Whether the kernel takes a cache's latent and rope widths (powers of two >= 16)."""
    return all(n >= 16 and not n & (n - 1) for n in (latent, rope))


def cache_write(c_kv: jax.Array, k_pe: jax.Array, layer, rows: jax.Array, positions: jax.Array, new: jax.Array, *,
                norm: tuple[jax.Array, float] | None = None, rope: tuple[jax.Array, jax.Array] | None = None,
                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``c_kv`` / ``k_pe`` with ``new[i, t, :C]`` / ``new[i, t, C:]`` (cast to the cache's dtypes) at
    ``(rows[i], layer, positions[i, t])`` for ``rows`` [n] (distinct), ``positions`` [n, T] and
    ``new`` [n, T, C + R]; positions outside ``[0, S)`` are dropped. ``norm=(scale, eps)``:
    the latent's RMSNorm is stored, with ``scale`` [C] or a stack [L, C] of one per layer of the
    cache (row ``layer`` used: read in place); ``rope=(cos, sin)`` (each [n, T, R / 2] float32):
    the key rotated. ``interpret=True`` runs the kernel body in Pallas' interpreter (CPU tests)."""
    Bc, L, S, C = c_kv.shape
    R = k_pe.shape[-1]
    n, T = positions.shape
    if k_pe.shape != (Bc, L, S, R) or new.shape != (n, T, C + R):
        raise ValueError(f"cache_write: shapes do not match: c_kv {c_kv.shape}, k_pe {k_pe.shape} (want [Bc, L, S, "
                         f"C or R]), new {new.shape} (want [n, T, C + R] with positions {positions.shape} = [n, T])")
    if jnp.shape(rows) != (n,):
        raise ValueError(f"cache_write: rows {jnp.shape(rows)} must be [n] = {(n,)}")
    if not fits(C, R):
        raise ValueError(f"cache_write: latent {C} and rope {R} widths must be powers of two >= 16")
    if norm is not None and (jnp.shape(norm[0]) not in ((C,), (L, C)) or not float(norm[1]) > 0):
        raise ValueError(f"cache_write: the norm's scale {jnp.shape(norm[0])} must be [C] = [{C}] or [L, C] = "
                         f"{[L, C]} and its eps {norm[1]} > 0")
    if rope is not None and any(jnp.shape(a) != (n, T, R // 2) for a in rope):
        raise ValueError(f"cache_write: cos {jnp.shape(rope[0])} and sin {jnp.shape(rope[1])} must be "
                         f"[n, T, R / 2] = {(n, T, R // 2)}")
    extras = (*(() if norm is None else (norm[0],)), *(() if rope is None else rope))
    return _call(jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(rows, jnp.int32), positions.astype(jnp.int32),
                 new, extras, c_kv, k_pe, eps=None if norm is None else float(norm[1]), rope=rope is not None,
                 interpret=interpret)


def _kernel(layer_ref, rows_ref, pos_ref, new_ref, *refs, S: int, C: int, R: int, eps: float | None, rope: bool):
    """Program ``(i, t)``: token t of row i. ``refs``: the norm's scale (with ``eps``), cos and
    sin (with ``rope``), the cache in, the cache out (the same buffers)."""
    refs = list(refs)
    scale_ref = refs.pop(0) if eps is not None else None
    cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rope else (None, None)
    _, _, c_ref, k_ref = refs  # the cache in is the cache out
    i, t = pl.program_id(0), pl.program_id(1)
    pos = pos_ref[i, t]

    @pl.when((pos >= 0) & (pos < S))
    def _():
        row, layer = rows_ref[i], layer_ref[0]
        latent = new_ref[i, t, pl.ds(0, C)]
        if eps is not None:
            x32 = latent.astype(jnp.float32)
            normed = (x32 * lax.rsqrt(jnp.sum(x32 * x32) / C + eps)).astype(latent.dtype)
            dtype = jnp.promote_types(scale_ref.dtype, latent.dtype)  # rms_norm's: scale * normed
            scale = scale_ref[...] if len(scale_ref.shape) == 1 else scale_ref[layer, :]
            latent = (scale.astype(jnp.float32) * normed.astype(jnp.float32)).astype(dtype)
        c_ref[row, layer, pos, :] = latent.astype(c_ref.dtype)
        if not rope:
            k_ref[row, layer, pos, :] = new_ref[i, t, pl.ds(C, R)].astype(k_ref.dtype)
            return
        even = 2 * lax.broadcasted_iota(jnp.int32, (R // 2,), 0)  # pair h is (2h, 2h + 1)
        a = plgpu.load(new_ref.at[i, t, C + even]).astype(jnp.float32)
        b = plgpu.load(new_ref.at[i, t, C + even + 1]).astype(jnp.float32)
        cos, sin = cos_ref[i, t, :], sin_ref[i, t, :]
        for offset, value in ((0, a * cos - b * sin), (1, b * cos + a * sin)):
            plgpu.store(k_ref.at[row, layer, pos, even + offset], value.astype(new_ref.dtype).astype(k_ref.dtype))


@functools.partial(jax.jit, static_argnames=("eps", "rope", "interpret"))
def _call(layer, rows, positions, new, extras, c_kv, k_pe, *, eps, rope, interpret):
    params = None if interpret else plgpu.CompilerParams(num_warps=1, num_stages=1)
    first = 4 + len(extras)  # the cache's operand index
    return pl.pallas_call(
        functools.partial(_kernel, S=c_kv.shape[2], C=c_kv.shape[3], R=k_pe.shape[3], eps=eps, rope=rope),
        out_shape=(jax.ShapeDtypeStruct(c_kv.shape, c_kv.dtype), jax.ShapeDtypeStruct(k_pe.shape, k_pe.dtype)),
        grid=positions.shape,
        input_output_aliases={first: 0, first + 1: 1},
        interpret=interpret,
        compiler_params=params,
        name="cache_write",
    )(layer, rows, positions, new, *extras, c_kv, k_pe)
