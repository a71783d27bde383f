"""Per-head matmuls against one layer of a stack of MLA ``kv_b_proj`` weights, read in place, in
Pallas' Triton lowering.

Shape letters: M rows of x (decode: 1..64), G heads, L layers, C the weights' first axis (MLA's
latent), W a head's row of the weights, of which the ``width`` columns from ``start`` are used (P).
With ``w`` [L, C, G, W] and a traced int32 ``layer`` (clamped to [0, L)):

    fold:   y[m, g, c] = sum_p x[m, g, p] * w[layer, c, g, start + p]    x [M, G, P] -> [M, G, C]
    unfold: y[m, g, p] = sum_c x[m, g, c] * w[layer, c, g, start + p]    x [M, G, C] -> [M, G, P]

MLA's absorbed attention folds its queries through ``kv_b_proj``'s key half and unfolds the
attention output through its value half. x and w are bf16 or float32 (the same); the result is
in x's dtype, accumulated in float32.

Why: XLA's batched dots want the batch axis (the heads) major in both operands; ``kv_b_proj``
[C, G, W] has it in the middle, so XLA transposes the weights for the dot. Inside a scan over a
run's layers it hoists that transpose out of the loop: every decode step rewrites the whole
stack (K2.5: 16.8 MB a layer, read and written; 71.5 us a step for 8 layers on an H200).
Here each program reads its tiles of layer ``layer`` from the stack as it lies, each byte once.

Design: the grid is ``(G, out / block_o)``. Program ``(g, j)`` owns head g's outputs
``[j * block_o, (j + 1) * block_o)``; it loops over the contracted axis in blocks of
``block_k``, loading x [Mp, block_k] (Mp: M rounded up to a power of two >= 16, as Triton's dots
want; rows past M are masked to zeros) and the weight tile (fold: ``w[layer, c block, g, start +
k block]``, rows strided by G * W; unfold: ``w[layer, k block, g, start + o block]``), and
accumulates their dot in float32 [Mp, block_o], stored once. float32 inputs use
``Precision.HIGHEST`` dots, bf16 the default precision.

Limits (:func:`fits`): 1 <= M <= 64; C, W, ``start`` and ``width`` multiples of 16; blocks are
powers of two >= 16 dividing the axes they cut.
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

from kimi_jax.kernels.stacked_matmul import MAX_ROWS, _pow2_at_least, _pow2_divisor  # noqa: E402

# Default (largest) outputs and contracted inputs per block. K2.5 (C 512, G 64, P 128): fold runs
# 64 x 8 programs with one [64, 128] tile each, unfold 64 x 4 programs with four [128, 32] tiles each.
BLOCK_O = {True: 64, False: 32}  # by fold
BLOCK_K = 128
NUM_WARPS, NUM_STAGES = 4, 3
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def fits(M: int, C: int, W: int, start: int, width: int) -> bool:
    """Whether the kernel takes M rows against weights [L, C, G, W] using columns
    ``[start, start + width)``: 1 <= M <= 64 and C, W, start, width multiples of 16. Else use XLA."""
    return (1 <= M <= MAX_ROWS and C > 0 and width > 0 and 0 <= start and start + width <= W
            and all(n % 16 == 0 for n in (C, W, start, width)))


def stacked_heads_reference(x, w, layer, *, start: int, width: int, fold: bool) -> jax.Array:
    """The definition in plain JAX (float32 products and sums), in x's dtype."""
    wl = lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)[..., start:start + width]
    spec = "mgp,cgp->mgc" if fold else "mgc,cgp->mgp"
    return jnp.einsum(spec, x, wl, precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32).astype(x.dtype)


def _kernel(layer_ref, x_ref, w_ref, y_ref, *, M: int, Mp: int, L: int, fold: bool, x_width: int, y_width: int,
            W: int, start: int, nk: int, block_o: int, block_k: int, precision):
    g, j = pl.program_id(0), pl.program_id(1)
    bo, bk = block_o, block_k
    layer = jnp.clip(layer_ref[0], 0, L - 1)
    o0 = pl.multiple_of(j * bo, bo)
    # Rows as an index vector (a static slice of Mp > M rows is out of bounds): rows >= M are masked off.
    rows = lax.broadcasted_iota(jnp.int32, (Mp, 1), 0)
    live = rows < M

    def body(kb, acc):
        k0 = pl.multiple_of(kb * bk, bk)
        xs = g * x_width + k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        xk = plgpu.load(x_ref.at[rows, xs], mask=jnp.broadcast_to(live, (Mp, bk)), other=0)
        if fold:  # [bo latents, bk columns of head g]
            wk = plgpu.load(w_ref.at[layer, pl.ds(o0, bo), pl.ds(pl.multiple_of(g * W + start + k0, 16), bk)])
            dims = (((1,), (1,)), ((), ()))
        else:  # [bk latents, bo columns of head g]
            wk = plgpu.load(w_ref.at[layer, pl.ds(k0, bk), pl.ds(pl.multiple_of(g * W + start + o0, 16), bo)])
            dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(xk, wk, dims, precision=precision, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, nk, body, jnp.zeros((Mp, bo), jnp.float32))
    ys = g * y_width + o0 + lax.broadcasted_iota(jnp.int32, (1, bo), 1)
    plgpu.store(y_ref.at[rows, ys], acc.astype(y_ref.dtype), mask=jnp.broadcast_to(live, (Mp, bo)))


def stacked_heads_matmul(x, w, layer, *, start: int, width: int, fold: bool, interpret: bool = False,
                         block_o: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None) -> jax.Array:
    """Head by head, ``x`` against columns ``[start, start + width)`` of layer ``layer`` of the
    stack ``w`` [L, C, G, W], read in place (see the module docstring for fold / unfold).

    ``block_o`` outputs and ``block_k`` contracted inputs per block (defaults: the largest powers
    of two up to ``BLOCK_O[fold]`` and 128 dividing them); ``num_warps`` (4) and ``num_stages`` (3)
    are Triton's. ``interpret=True`` runs the kernel body in Pallas' interpreter (CPU tests).
    """
    name = "stacked_heads_matmul"
    if w.ndim != 4:
        raise ValueError(f"{name}: w {w.shape} must be a 4-D stack [L, C, G, W]")
    L, C, G, W = w.shape
    if x.ndim != 3:
        raise ValueError(f"{name}: x {x.shape} must be 3-D [M, G, {'P' if fold else 'C'}]")
    if not (0 <= start and 0 < width and start + width <= W):
        raise ValueError(f"{name}: columns [{start}, {start + width}) are not inside a head's {W}")
    M, (in_width, out_width) = x.shape[0], ((width, C) if fold else (C, width))
    if x.shape[1:] != (G, in_width):
        raise ValueError(f"{name}: x {x.shape} does not match w {w.shape}: want [M, {G}, {in_width}]")
    if jnp.dtype(x.dtype) not in _DTYPES or w.dtype != x.dtype:
        raise ValueError(f"{name}: x {x.dtype} and w {w.dtype} must be both bfloat16 or both float32")
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"{name}: M = {M} rows of x; the kernel takes 1 to {MAX_ROWS} (use XLA)")
    if L < 1:
        raise ValueError(f"{name}: empty stack w {w.shape}")
    for label, n in (("C", C), ("W", W), ("start", start), ("width", width)):
        if n % 16:
            raise ValueError(f"{name}: {label} = {n} is not a multiple of 16")
    for label, given, n, largest in (("block_o", block_o, out_width, BLOCK_O[fold]),
                                     ("block_k", block_k, in_width, BLOCK_K)):
        if given is not None and (given < 16 or given & (given - 1) or n % given):
            raise ValueError(f"{name}: {label} = {given} must be a power of two >= 16 dividing {n}")
    block_o = block_o or _pow2_divisor(out_width, BLOCK_O[fold])
    block_k = block_k or _pow2_divisor(in_width, BLOCK_K)
    for label, size in (("x", x.size), ("the output", M * G * out_width)):
        if size >= 2**31:
            raise ValueError(f"{name}: {label} has {size} elements; the kernel addresses at most 2^31 - 1")
    y = _call(x.reshape(M, G * in_width), w.reshape(L, C, G * W), jnp.asarray(layer, jnp.int32).reshape(1),
              G=G, start=start, width=width, fold=fold, block_o=block_o, block_k=block_k,
              num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES, interpret=interpret)
    return y.reshape(M, G, out_width)


@functools.partial(jax.jit, static_argnames=("G", "start", "width", "fold", "block_o", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def _call(x, w, layer, *, G, start, width, fold, block_o, block_k, num_warps, num_stages, interpret):
    M, (L, C, GW) = x.shape[0], w.shape
    in_width, out_width = (width, C) if fold else (C, width)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        functools.partial(_kernel, M=M, Mp=_pow2_at_least(M, 16), L=L, fold=fold, x_width=in_width,
                          y_width=out_width, W=GW // G, start=start, nk=in_width // block_k, block_o=block_o,
                          block_k=block_k, precision=precision),
        out_shape=jax.ShapeDtypeStruct((M, G * out_width), x.dtype),
        grid=(G, out_width // block_o),
        interpret=interpret,
        compiler_params=params,
        name="stacked_heads_fold" if fold else "stacked_heads_unfold",
    )(layer, x, w)
