"""New entries of one layer of the stacked compressed cache, written in place in one launch
(Pallas' Triton lowering).

With the latents ``c_kv`` [Bc, L, S, C] and roped keys ``k_pe`` [Bc, L, S, R] of a run's
layers, a cached step stores each new token's latent and key at ``(rows[i], layer,
positions[i, t])``. XLA lowers that scatter (``kimi_jax.model.cache.LayerCache.write``, the
reference) at one token to five kernels per layer (the in-bounds test, a read of the old entry
and an in-place update for each array): on an H100 about 8 us a K2.5 decode layer. Here one
program per new token stores both rows, nothing else is read, and positions outside ``[0, S)``
are dropped (the reference's ``mode="drop"``).

The cache arrays are aliased to the outputs: the update is in place when they are donated (as a
decode step's cache is, and a scan's carry). C and R must be powers of two >= 16 (a Triton
block each); the Triton lowering uses 64-bit element offsets for operands over 4 GiB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas API; absent in some jax builds.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


def fits(latent: int, rope: int) -> bool:
    """Whether the kernel takes a cache's latent and rope widths (powers of two >= 16)."""
    return all(n >= 16 and not n & (n - 1) for n in (latent, rope))


def cache_write(c_kv: jax.Array, k_pe: jax.Array, layer, rows: jax.Array, positions: jax.Array,
                c_new: jax.Array, k_new: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``c_kv`` / ``k_pe`` with ``c_new[i, t]`` [C] / ``k_new[i, t]`` [R] (cast to the cache's
    dtypes) at ``(rows[i], layer, positions[i, t])`` for ``rows`` [n] (distinct) and ``positions``
    [n, T]; positions outside ``[0, S)`` are dropped. ``interpret=True`` runs the kernel body in
    Pallas' interpreter (CPU tests)."""
    Bc, L, S, C = c_kv.shape
    R = k_pe.shape[-1]
    n, T = positions.shape
    if k_pe.shape != (Bc, L, S, R) or c_new.shape != (n, T, C) or k_new.shape != (n, T, R):
        raise ValueError(f"cache_write: shapes do not match: c_kv {c_kv.shape}, k_pe {k_pe.shape} (want [Bc, L, S, "
                         f"C or R]), c_new {c_new.shape}, k_new {k_new.shape} (want [n, T, C or R] with positions "
                         f"{positions.shape} = [n, T])")
    if jnp.shape(rows) != (n,):
        raise ValueError(f"cache_write: rows {jnp.shape(rows)} must be [n] = {(n,)}")
    if not fits(C, R):
        raise ValueError(f"cache_write: latent {C} and rope {R} widths must be powers of two >= 16")
    return _call(jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(rows, jnp.int32),
                 positions.astype(jnp.int32), c_new, k_new, c_kv, k_pe, interpret=interpret)


def _kernel(layer_ref, rows_ref, pos_ref, c_new_ref, k_new_ref, c_in_ref, k_in_ref, c_ref, k_ref, *, S: int):
    del c_in_ref, k_in_ref  # the same buffers as c_ref, k_ref
    i, t = pl.program_id(0), pl.program_id(1)
    pos = pos_ref[i, t]

    @pl.when((pos >= 0) & (pos < S))
    def _():
        row, layer = rows_ref[i], layer_ref[0]
        c_ref[row, layer, pos, :] = c_new_ref[i, t, :].astype(c_ref.dtype)
        k_ref[row, layer, pos, :] = k_new_ref[i, t, :].astype(k_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _call(layer, rows, positions, c_new, k_new, c_kv, k_pe, *, interpret):
    params = None if interpret else plgpu.CompilerParams(num_warps=1, num_stages=1)
    return pl.pallas_call(
        functools.partial(_kernel, S=c_kv.shape[2]),
        out_shape=(jax.ShapeDtypeStruct(c_kv.shape, c_kv.dtype), jax.ShapeDtypeStruct(k_pe.shape, k_pe.dtype)),
        grid=positions.shape,
        input_output_aliases={5: 0, 6: 1},
        interpret=interpret,
        compiler_params=params,
        name="cache_write",
    )(layer, rows, positions, c_new, k_new, c_kv, k_pe)
