"""Fused INT4 grouped matmul (``jax.lax.ragged_dot`` semantics) in Pallas for TPU (Mosaic).

    y[r] = x[r] @ W[e(r)].T,  W[e] = q[e] * scale[e] (one scale per 32 inputs)

The same contract as the GPU kernel (``kimi_jax.kernels.int4_grouped``): ``x`` ``[M, in]``
(bf16 or float32) with rows grouped contiguously by expert, ``q`` ``[E, out, in/8]`` uint32
words (input ``8k + j`` is nibble ``j`` of word ``k``, stored as ``q + 8``), ``scales``
``[E, out, in/32]``, ``group_sizes`` ``[E]`` int32 with ``sum <= M``. Returns ``[M, out]`` in
x's dtype, float32 accumulation, zeros past ``sum(group_sizes)``. The words and scales are
copied to VMEM as they are and dequantized there: no bf16 copy of W is written to HBM.

Schedule (as megablox's ``gmm``). Rows are cut into tiles of ``block_m``; a *work item* is
one (row tile, expert) pair whose rows overlap, plus one item per row tile wholly past
``sum(group_sizes)`` (it writes zeros). :func:`work_items` lists them in plain JAX (ordered
by expert, so row tiles never decrease) and they reach the kernel by scalar prefetch. The
grid is (out tiles, work items, in blocks): an item's block indices come from the prefetched
lists, so an expert without rows has no item and its weights are never read, and the
items past the real count repeat the last one's blocks (no copy) and do nothing. An output
tile stays in VMEM while consecutive items share its row tile: the first zeroes it, each
writes its expert's rows.

Dequantization without re-interleaving nibbles: ``x``'s columns are permuted outside the
kernel into *planes* (within each block of ``block_k`` inputs, plane ``j`` holds inputs
``8k + j``), so nibble ``j`` of every word meets plane ``j`` of x: eight matmuls of
``[block_m, block_k/8] x [block_k/8, block_n]`` per block. The per-32 scales are widened to
one per word (4 words share a scale) by a matmul with a 0/1 matrix: exact, and the matrix
unit does it. Each weight is q * scale rounded once to x's dtype, as the reference
(``kimi_jax.quant.formats.int4_ragged_dot``).

Tiling. Mosaic wants a block's last dimension to be a multiple of 128 or the whole axis: the
words' block is ``block_k / 8`` wide and the scales' ``block_k / 32``, so ``block_k`` is the
whole input axis unless it is a multiple of 4096 that divides it (K2.5: 7168 and 2048, whole).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

GROUP = 32  # inputs per scale (K2.5's INT4 format)
_WORD = 8  # inputs per uint32 word


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes: rows per tile (``block_m``), outputs per tile (``block_n``), inputs per
    block (``block_k``; ``None``: the whole input axis)."""

    block_m: int = 128
    block_n: int = 256
    block_k: int | None = None


def fit_config(cfg: Config, m: int, n: int, k: int) -> Config:
    """``cfg`` fitted to the shapes: ``block_m`` no larger than M rounded up to 16 rows,
    ``block_n`` the whole out axis when it does not divide it, ``block_k`` the whole in
    axis unless it is a multiple of 4096 dividing it."""
    bm = min(cfg.block_m, -(-m // 16) * 16)
    bn = cfg.block_n if n % cfg.block_n == 0 else n
    bk = cfg.block_k if cfg.block_k and k % cfg.block_k == 0 and cfg.block_k % 4096 == 0 else k
    return Config(bm, bn, bk)


def max_items(m_tiles: int, e: int, m: int) -> int:
    """Static bound on the work items of any ``group_sizes`` with sum <= m: the tiles covered
    by the rows plus one extra per non-empty expert but the first, plus the free tiles."""
    return m_tiles + min(e, m)


def work_items(group_sizes: jax.Array, m_tiles: int, block_m: int) -> tuple[jax.Array, ...]:
    """The kernel's schedule: per work item (``max_items`` of them) its row tile, its
    expert, the first and end row of that expert (an empty range for a tile of zeros),
    and the number of real items ``[1]``. Items past that repeat the last real one."""
    e = group_sizes.shape[0]
    m = m_tiles * block_m
    w_max = max_items(m_tiles, e, m)
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first = starts // block_m
    n_items = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)
    offsets = jnp.cumsum(n_items)
    n_group = offsets[-1]
    free_from = -(-ends[-1] // block_m)  # first tile with no row of any expert
    count = n_group + (m_tiles - free_from)

    w = jnp.arange(w_max, dtype=jnp.int32)
    w = jnp.minimum(w, count - 1)  # past the count: the last real item again
    g = jnp.minimum(jnp.searchsorted(offsets, w, side="right"), e - 1).astype(jnp.int32)
    in_group = w < n_group
    last_expert = jnp.minimum(jnp.searchsorted(offsets, n_group - 1, side="right"), e - 1).astype(jnp.int32)
    tiles = jnp.where(in_group, first[g] + w - (offsets[g] - n_items[g]), free_from + w - n_group)
    experts = jnp.where(in_group, g, last_expert)  # a tile of zeros reads the previous item's weights
    row0 = jnp.where(in_group, starts[g], 0)
    row1 = jnp.where(in_group, ends[g], 0)
    return tiles.astype(jnp.int32), experts, row0, row1, count.reshape(1).astype(jnp.int32)


def to_planes(x: jax.Array, block_k: int) -> jax.Array:
    """Columns of ``x`` [M, in] permuted within each block of ``block_k`` so that plane ``j``
    (columns ``j * block_k/8`` to ``(j + 1) * block_k/8`` of the block) holds inputs ``8k + j``."""
    m, k = x.shape
    return x.reshape(m, k // block_k, block_k // _WORD, _WORD).swapaxes(2, 3).reshape(m, k)


def _kernel(tiles, experts, row0, row1, count, x_ref, q_ref, s_ref, o_ref, acc_ref, *, n_k: int, precision):
    w, kb = pl.program_id(1), pl.program_id(2)
    real = w < count[0]
    first_visit = (w == 0) | (tiles[w] != tiles[jnp.maximum(w - 1, 0)])

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real & (row0[w] < row1[w]))
    def _():
        q = q_ref[0]  # [bn, bw] int32 words
        bn, bw = q.shape
        bg = s_ref.shape[-1]
        widen = (lax.broadcasted_iota(jnp.int32, (bg, bw), 0) == lax.broadcasted_iota(jnp.int32, (bg, bw), 1) // 4)
        scale = jnp.dot(s_ref[0].astype(jnp.float32), widen.astype(jnp.float32), preferred_element_type=jnp.float32)
        acc = acc_ref[...]
        for j in range(_WORD):
            nibble = lax.shift_right_logical(q, jnp.int32(4 * j)) & 0xF
            wj = ((nibble - 8).astype(jnp.float32) * scale).astype(x_ref.dtype)  # [bn, bw]
            xj = x_ref[:, j * bw:(j + 1) * bw]  # [bm, bw]
            acc += lax.dot_general(xj, wj, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)
        acc_ref[...] = acc

    @pl.when(real & (kb == n_k - 1))
    def _():
        bm = o_ref.shape[0]
        rows = tiles[w] * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        mine = (rows >= row0[w]) & (rows < row1[w])
        previous = jnp.where(first_visit, jnp.zeros(o_ref.shape, o_ref.dtype), o_ref[...])
        o_ref[...] = jnp.where(mine, acc_ref[...].astype(o_ref.dtype), previous)


def int4_grouped_matmul_tpu(
    x: jax.Array, q: jax.Array, scales: jax.Array, group_sizes: jax.Array, *, cfg: Config = Config(),
    interpret: bool = False,
) -> jax.Array:
    """``jax.lax.ragged_dot(x, W.T per expert, group_sizes)`` for INT4 ``q`` / ``scales``; see
    the module doc. ``interpret=True`` runs the kernel in Pallas' interpreter (CPU tests)."""
    if q.dtype != jnp.uint32 or q.ndim != 3:
        raise ValueError(f"int4_grouped_matmul_tpu: q must be uint32 words [E, out, in/8], got {q.dtype} {q.shape}")
    e, n, words = q.shape
    m, k = x.shape
    if words * _WORD != k:
        raise ValueError(f"int4_grouped_matmul_tpu: q {q.shape} (8 inputs per word) does not match x {x.shape}")
    if k % GROUP or scales.shape != (e, n, k // GROUP):
        raise ValueError(f"int4_grouped_matmul_tpu: scales {scales.shape} do not match q {q.shape} (one per {GROUP})")
    if group_sizes.shape != (e,):
        raise ValueError(f"int4_grouped_matmul_tpu: group_sizes {group_sizes.shape} must be [{e}]")
    return _call(x, q, scales, group_sizes, cfg=fit_config(cfg, m, n, k), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _call(x, q, scales, group_sizes, *, cfg: Config, interpret: bool):
    (m, k), (e, n, _) = x.shape, q.shape
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m_tiles, n_k = -(-m // bm), k // bk
    schedule = work_items(group_sizes, m_tiles, bm)
    xp = to_planes(jnp.pad(x, ((0, m_tiles * bm - m), (0, 0))), bk)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(schedule),
        grid=(n // bn, max_items(m_tiles, e, m_tiles * bm), n_k),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda nb, w, kb, tiles, experts, *_: (tiles[w], kb)),
            pl.BlockSpec((1, bn, bk // _WORD), lambda nb, w, kb, tiles, experts, *_: (experts[w], nb, kb)),
            pl.BlockSpec((1, bn, bk // GROUP), lambda nb, w, kb, tiles, experts, *_: (experts[w], nb, kb)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda nb, w, kb, tiles, *_: (tiles[w], nb)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, n_k=n_k, precision=precision),
        out_shape=jax.ShapeDtypeStruct((m_tiles * bm, n), x.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="int4_grouped_matmul_tpu",
    )(*schedule, xp, lax.bitcast_convert_type(q, jnp.int32), scales)
    return out[:m]
