"""One layer's matmul out of a stack of per-layer weights, read in place, in Pallas' Triton lowering.

Shape letters: M rows of x (decode: 1..64), K inputs, N outputs, L layers of the stack.

    y[m, n] = sum_k x[m, k] * w[layer, k, n]

``x`` [M, K] and ``w`` [L, K, N] (bf16 or float32, the same dtype), a traced int32 ``layer``
(clamped to [0, L)). Returns [M, N] in x's dtype (or ``out_dtype``) with float32 accumulation.

Why: inside a ``jax.lax.scan`` over layers, XLA on GPU materializes the dynamic slice
``w[layer]`` of the stacked weights as a copy before the dot; at decode (a few rows) that
copy moves as many bytes as the matmul reads. Here ``layer`` is an int32 [1] operand that each
program loads and indexes the stack with (the Triton lowering has no scalar prefetch), so
only layer ``layer``'s weights are read from HBM, once, and no copy is made.

Design: split-K, one launch plus a sum. The grid is ``(N / block_n, splits)``. Program
``(j, s)`` owns the output columns ``[j * block_n, (j + 1) * block_n)`` and a contiguous run
of the ``nk = K / block_k`` K blocks, ``per = cdiv(nk, splits)`` of them: blocks ``[s * per,
min((s + 1) * per, nk))`` (an empty run gives zeros). For each block it loads ``x`` [Mp,
block_k] (Mp: M rounded up to a power of two >= 16, as Triton's dots want; rows past M are
masked to zeros) and ``w[layer]`` [block_k, block_n], and accumulates their dot in float32
[Mp, block_n]. It stores its rows below M to ``partials[s]``, float32 [splits, M, N]; the
partials are summed over the splits outside the kernel (deterministic, no atomics) and cast
to the output dtype. With M small one program's dot is tiny, so bandwidth comes from many
programs streaming the weights: the default ``splits`` (:func:`auto_splits`) makes about two
programs per SM. float32 inputs use ``Precision.HIGHEST`` dots, bf16 the default precision.

Several stacks (:func:`stacked_matmuls`: projections of one input, such as attention's q and
kv down projections, or the router and the shared experts' gate and up) go into one launch:
their column blocks side by side on the grid's first axis, one partials buffer, each output's sum
over its own columns.

Limits: 1 <= M <= 64 (:func:`fits`); ``block_n`` and ``block_k`` powers of two >= 16 dividing
N and K (defaults: the largest such up to 128 and 128). x and the partials are held below 2^31
elements as in the other kernels; the stack may be larger: the Triton lowering takes 64-bit
element offsets for an operand over 4 GiB, and a bf16 / float32 operand below that has
fewer than 2^31 elements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas API; absent in some jax builds.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

NUM_SMS = 132  # streaming multiprocessors of an H100 SXM / H200
MAX_ROWS = 64  # most rows of x: one [Mp, block_n] float32 accumulator per program
# Default (largest) output columns and inputs per block: with 3 stages the pipelined tiles take at most
# 3 x (128 x 128 weights + 64 x 128 rows) x 2 bytes = 144 KB of shared memory (227 KB on an H100 / H200).
BLOCK_N, BLOCK_K = 128, 128
NUM_WARPS, NUM_STAGES = 4, 3
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _pow2_divisor(n: int, largest: int) -> int | None:
    """The largest power of two in [16, largest] dividing n, or None."""
    b = largest
    while b > 16 and n % b:
        b //= 2
    return None if n % b else b


def fits(M: int, K: int, N: int) -> bool:
    """Whether the kernel takes x [M, K] times a stack of [K, N] weights: 1 <= M <= 64 and
    K, N multiples of 16 (blocks are powers of two >= 16 dividing them). Else use XLA."""
    return 1 <= M <= MAX_ROWS and K > 0 and N > 0 and K % 16 == 0 and N % 16 == 0


def auto_splits(k_blocks: int, n_blocks: int, *, num_sms: int = NUM_SMS) -> int:
    """The default (static) number of splits of the ``k_blocks`` K blocks: about two programs
    per SM over the ``n_blocks`` column blocks, within [1, k_blocks], then lowered to the
    splits that ``per = cdiv(k_blocks, splits)`` blocks each leave non-empty."""
    want = max(1, min(k_blocks, round(2 * num_sms / n_blocks)))
    return _cdiv(k_blocks, _cdiv(k_blocks, want))


def stacked_matmul_reference(x, w, layer, out_dtype=None) -> jax.Array:
    """The definition in plain JAX (float32 products and sums): ``x @ w[layer]`` in
    ``out_dtype`` (default x's)."""
    wl = lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)
    y = jnp.dot(x, wl, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def _kernel(layer_ref, x_ref, *refs, M: int, Mp: int, L: int, nk: int, per: int, block_n: int, block_k: int,
            precision, starts: tuple[int, ...]):
    """Program ``(j, s)``: column block ``j`` of the weights side by side (block ``j`` is in
    weight ``i`` where ``starts[i] <= j < starts[i + 1]``), the K blocks of split ``s``."""
    w_refs, p_ref = refs[:-1], refs[-1]
    j, s = pl.program_id(0), pl.program_id(1)
    bn, bk = block_n, block_k
    layer = jnp.clip(layer_ref[0], 0, L - 1)
    lo = s * per
    hi = jnp.minimum(lo + per, nk)
    # Rows as an index vector (a static slice of Mp > M rows is out of bounds): rows >= M are masked
    # off, so Triton never touches them (the interpreter clamps their loads and drops their stores).
    rows = lax.broadcasted_iota(jnp.int32, (Mp, 1), 0)
    live = rows < M
    cols = pl.multiple_of(j * bn, bn) + lax.broadcasted_iota(jnp.int32, (1, bn), 1)

    def column_block(w_ref, n0):
        def body(kb, acc):
            k0 = pl.multiple_of(kb * bk, bk)
            ks = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            xk = plgpu.load(x_ref.at[rows, ks], mask=jnp.broadcast_to(live, (Mp, bk)), other=0)
            wk = plgpu.load(w_ref.at[layer, pl.ds(k0, bk), pl.ds(n0, bn)])
            return acc + lax.dot_general(xk, wk, (((1,), (0,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(lo, hi, body, jnp.zeros((Mp, bn), jnp.float32))  # no blocks (lo >= nk): zeros
        plgpu.store(p_ref.at[s, rows, cols], acc, mask=jnp.broadcast_to(live, (Mp, bn)))

    if len(w_refs) == 1:
        column_block(w_refs[0], pl.multiple_of(j * bn, bn))
        return
    for i, w_ref in enumerate(w_refs):
        @pl.when((j >= starts[i]) & (j < starts[i + 1]))
        def _(w_ref=w_ref, first=starts[i]):
            column_block(w_ref, pl.multiple_of((j - first) * bn, bn))


def stacked_matmul(x, w, layer, *, out_dtype=None, interpret: bool = False, block_n: int | None = None,
                   block_k: int | None = None, splits: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None) -> jax.Array:
    """``x [M, K] @ w[layer]`` for a stack ``w [L, K, N]``, reading layer ``layer`` (int32,
    traced, clamped to [0, L)) in place: [M, N] in ``out_dtype`` (default x's dtype), float32
    accumulation.

    ``block_n`` output columns and ``block_k`` inputs per block (default: the largest powers of
    two up to 128 dividing N and K); ``splits`` programs share each column block's K
    blocks (default :func:`auto_splits`); ``num_warps`` (4) and ``num_stages`` (3) are
    Triton's. ``interpret=True`` runs the kernel body in Pallas' interpreter (CPU tests).
    """
    return stacked_matmuls(x, (w,), layer, out_dtypes=(out_dtype,), interpret=interpret, block_n=block_n,
                           block_k=block_k, splits=splits, num_warps=num_warps, num_stages=num_stages)[0]


def stacked_matmuls(x, ws, layer, *, out_dtypes=None, interpret: bool = False, block_n: int | None = None,
                    block_k: int | None = None, splits: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None) -> tuple[jax.Array, ...]:
    """:func:`stacked_matmul` of one ``x`` with several stacks ``ws`` (each ``[L, K, N_i]``, one
    L, K and dtype), in one launch: their column blocks side by side in one grid, one
    partials buffer (each output sums its own columns). A tuple of ``[M, N_i]``, each in
    ``out_dtypes[i]`` (None: x's dtype). ``block_n`` divides every N_i (default: the largest power of two up
    to 128 that does)."""
    ws = tuple(ws)
    out_dtypes = tuple(out_dtypes) if out_dtypes is not None else (None,) * len(ws)
    if not ws or len(out_dtypes) != len(ws):
        raise ValueError(f"stacked_matmul: {len(ws)} weight stacks and {len(out_dtypes)} output dtypes")
    if x.ndim != 2:
        raise ValueError(f"stacked_matmul: x {x.shape} must be 2-D [M, K]")
    M, K = x.shape
    for w in ws:
        if w.ndim != 3:
            raise ValueError(f"stacked_matmul: w {w.shape} must be a 3-D stack [L, K, N]")
        if w.shape[1] != K:
            raise ValueError(f"stacked_matmul: K mismatch: x {x.shape} and w {w.shape} (want [L, {K}, N])")
        if jnp.dtype(x.dtype) not in _DTYPES or w.dtype != x.dtype:
            raise ValueError(f"stacked_matmul: x {x.dtype} and w {w.dtype} must be both bfloat16 or both float32")
        if w.shape[0] != ws[0].shape[0]:
            raise ValueError(f"stacked_matmul: stacks of {w.shape[0]} and {ws[0].shape[0]} layers")
        if w.shape[0] < 1 or w.shape[2] < 1:
            raise ValueError(f"stacked_matmul: empty stack w {w.shape}")
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"stacked_matmul: M = {M} rows of x; the kernel takes 1 to {MAX_ROWS} (use XLA)")
    Ns = [w.shape[2] for w in ws]
    for name, given, sizes, largest in (("block_n", block_n, Ns, BLOCK_N), ("block_k", block_k, [K], BLOCK_K)):
        dim = "N" if name == "block_n" else "K"
        for n in sizes:
            if given is None:
                if _pow2_divisor(n, largest) is None:
                    raise ValueError(
                        f"stacked_matmul: {dim} = {n} is not divisible by 16 (blocks are powers of two >= 16)")
            elif given < 16 or given & (given - 1) or n % given:
                raise ValueError(f"stacked_matmul: {name} = {given} must be a power of two >= 16 dividing {dim} = {n}")
    block_n = block_n or min(_pow2_divisor(n, BLOCK_N) for n in Ns)
    block_k = block_k or _pow2_divisor(K, BLOCK_K)
    nk = K // block_k
    if splits is None:
        splits = auto_splits(nk, sum(Ns) // block_n)
    elif splits < 1:
        raise ValueError(f"stacked_matmul: splits = {splits} must be >= 1")
    for name, size in (("x", x.size), ("the partials [splits, M, N]", splits * M * sum(Ns))):
        if size >= 2**31:
            raise ValueError(f"stacked_matmul: {name} has {size} elements; the kernel addresses at most 2^31 - 1")
    return _call(x, ws, jnp.asarray(layer, jnp.int32).reshape(1),
                 out_dtypes=tuple(jnp.dtype(d or x.dtype) for d in out_dtypes), block_n=block_n, block_k=block_k,
                 splits=splits, num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES,
                 interpret=interpret)


@functools.partial(jax.jit, static_argnames=("out_dtypes", "block_n", "block_k", "splits", "num_warps", "num_stages",
                                             "interpret"))
def _call(x, ws, layer, *, out_dtypes, block_n, block_k, splits, num_warps, num_stages, interpret):
    M, K = x.shape
    L, Ns = ws[0].shape[0], [w.shape[2] for w in ws]
    nk = K // block_k
    starts = tuple(int(v) for v in np.cumsum([0, *(n // block_n for n in Ns)]))
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    partials = pl.pallas_call(
        functools.partial(_kernel, M=M, Mp=_pow2_at_least(M, 16), L=L, nk=nk, per=_cdiv(nk, splits),
                          block_n=block_n, block_k=block_k, precision=precision, starts=starts),
        out_shape=jax.ShapeDtypeStruct((splits, M, sum(Ns)), jnp.float32),
        grid=(starts[-1], splits),
        interpret=interpret,
        compiler_params=params,
        name="stacked_matmul",
    )(layer, x, *ws)
    edges = np.cumsum([0, *Ns])  # each output sums its own columns: one reduction apiece, no slices after it
    return tuple(partials[:, :, a:b].sum(0).astype(d) for a, b, d in zip(edges[:-1], edges[1:], out_dtypes,
                                                                              strict=True))
