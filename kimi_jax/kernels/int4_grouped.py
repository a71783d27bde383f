"""Fused INT4 grouped matmul (``jax.lax.ragged_dot`` semantics) in Pallas, Triton lowering.

    y[r] = x[r] @ W[e(r)].T,  W[e] = q[e] * scale[e] (one scale per 32 inputs)

for rows ``r`` of x grouped contiguously by expert (``group_sizes[e]`` rows each). The int4
values and their scales are read once from HBM and dequantized in registers: no bf16 copy
of W is ever written. Row tiles are scheduled per expert from ``group_sizes`` (a tile never
spans two experts), so an expert with no rows costs nothing and its weights are never read:
one launch per projection serves decode (a few rows over a few experts) and prefill alike.

Contract (the project's device format, see ``kimi_jax.quant.formats``):

* ``x`` ``[M, in]`` (bf16 or float32), rows grouped contiguously by expert;
* ``q`` ``[E, out, in/8]`` ``uint32`` words: input ``8k + j`` of a row is nibble ``j`` of word
  ``k``, stored as ``q + 8`` (the checkpoints' compressed-tensors ``pack-quantized`` words);
* ``scales`` ``[E, out, in/32]`` (bf16 in checkpoints);
* ``group_sizes`` ``[E]`` int32 with ``sum <= M``.

Returns ``[M, out]`` in x's dtype with float32 accumulation. Rows past ``sum(group_sizes)``
are zeros (as ``jax.lax.ragged_dot``). W is rounded to x's dtype once (q * scale, as the
reference), so the result equals the reference path up to the order of float32 accumulation.

Design. The grid is (out tiles, row tiles). Each program derives its row tile (its
expert, first row and end row) from ``group_sizes`` itself (``_tile``: a few scans and
reductions, so a call is one launch with no schedule kernel before it); ``tile_schedule``
states the same schedule in plain JAX, for the tests. The number of row tiles is bounded
statically by ``M // block_m + min(E, M) + 1``;
tiles past the real count exit at once, and the tiles that cover rows past
``sum(group_sizes)`` write zeros. Each program loops over ``in`` in blocks of ``block_k``:
it loads the row tile of x, the words of the block ``[block_n, block_k]`` and its scales
``[block_n, block_k / 32]``, dequantizes in registers and accumulates ``W @ x.T`` into a
float32 ``[block_n, block_m]`` tile (the weight is the left operand: with few rows the
expert's output dimension fills the matrix unit's M side). The out-tile axis is the fastest
one of the grid, so the programs that share a row tile of x run together and reuse it from
L2, and for prefill the few row tiles of one expert read its weights close in time.

Several weights of one shape (``int4_grouped_matmuls``: a SwiGLU's gate and up, which share
their rows and schedule) run in one launch: the grid's first axis holds every weight's
column tiles, side by side, and so does the output. One launch instead of two, and twice
the programs for the GPU to keep busy at decode.

Per-row mode (``int4_rows_matmuls``). Decoding one sequence gives 8 rows, one per chosen
expert, all distinct. Grouping them costs work of its own: a sort (or rank) of the ids, a
gather of the rows into expert order, a gather of the outputs back, and every program's
schedule prologue above, a few scans over the ``[E]`` group sizes before its first weight
load. In per-row mode ``g_ref`` holds each row's expert id instead: program ``(j, r)`` reads
one id and streams that expert's weights against x row ``r // fanout`` (the ``fanout`` top-k
copies of a token share its x row, so x is never gathered either). One-row (``gemv``) tiles
only; rows sharing an expert each read it, so it suits a token or two, not a batch.

Split-K (``Config.splits``; 1 is off). With few rows the grid is small (decode's 8 rows
over 8 experts, 2048 outputs in 64-wide tiles: 256 working programs for 132 SMs, each streaming
the whole ``in`` range), too few programs per SM to keep HBM busy. With ``splits = S > 1`` a
third grid axis shares each tile's n_k = in / block_k k-blocks among S programs (contiguous
ranges of ``ceil(n_k / S)`` blocks; the last ones may be short or empty): S times the programs
for the same weight bytes, each read once. The price: every program stores a float32 partial
into a ``[S, M, out]`` buffer (``S * M * out * 4`` bytes written, then read back), and a sum
over S with the cast to x's dtype runs after the kernel in XLA; the float32 accumulation order
changes with S. Only worth it for few rows: the default uses S = 2 at one token for inputs of
4096 and more (K2.5's gate / up); ``config=decode_split_config(m, e, n, k, splits)`` sets S.

One-row tiles (``Config.gemv``). With one row per expert (decode at one token) a 16-row
matrix-unit tile is one sixteenth used, and each nibble plane still goes through the matrix
units' operand layout. A gemv config gives every row its own tile (block_m 1) and uses no
matrix unit: each nibble becomes the float32 ``136 + q`` (``_nibble``: one shift, one
and-or) and one multiply-add adds its product with its input to a ``[block_n, block_k / 8]``
float32 accumulator; the offset and the scale are applied once per word (``_gemv``), and
the words are summed once at the end. W is not rounded to x's dtype there: with bf16 x the
result differs from the reference by that rounding. Each nibble position j multiplies the
inputs ``8 c + j``: a strided gather from x as it lies, or with ``Config.x_planes`` one
contiguous load from x laid out ``[M, 8, in / 8]`` (a transpose of a few KB before the
kernel, which XLA can fuse into the op that makes x). The default up to 8 rows and in
per-row mode (:func:`rows_config`) is strided x with 256-input blocks: in a whole decode step
on an H100 the gate + up launch took 71.9 us that way against 81.7 and 85.5 us with planes of
x (512- and 256-input blocks, one run), although alone, in a microbenchmark of the same run,
planes with 512-input blocks were the faster (65.6 against 72.2 us; ``benchmarks/RESULTS.md``).
About 3 operations per weight remain (shift, and-or, multiply-add): 8 experts' three projections are 3.5e8 weights, 3.3e7 warp instructions,
36 us of issue on an H100's 132 SMs, against 62 us to read them at 3.2 TB/s: a large share
that overlaps the loads only in part.

Dequantization. Each nibble becomes a bf16 value by integer ops (``0x4300 | (q + 8)`` is
the bf16 number ``136 + q``) instead of an int -> float conversion. Why words rather than
``jnp.int4``: the Triton lowering computes element offsets in 32 bits, and a K2.5 expert
stack holds 2.8e9 int4 bytes (past 2^31) but 7e8 words. Every operand's element count is
checked against that limit.

The reference path is ``kimi_jax.quant.formats.int4_ragged_dot`` (dequantize in HBM, then
``jax.lax.ragged_dot``).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas API; absent in some jax builds.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

GROUP = 32  # inputs per scale (K2.5's INT4 format)
_MAGIC = 0x4300  # bf16 bits of 128.0: 0x4300 | v (v < 128) is the bf16 number 128 + v


# --------------------------------------------------------------------------- schedule


def max_row_tiles(m: int, e: int, block_m: int) -> int:
    """Static bound on the row tiles of any ``group_sizes`` with sum <= m.

    Each non-empty expert adds at most one partial tile, and the rows past the sum one more:
    sum_e ceil(g_e / bm) + ceil((m - S) / bm) < m / bm + n_nonempty + 1.
    """
    return m // block_m + min(e, m) + 1


def tile_schedule(group_sizes: jax.Array, m: int, block_m: int) -> jax.Array:
    """int32 ``[3, T]`` (T = ``max_row_tiles``): per row tile its expert, first row, end row.

    Expert -1 marks a tile of rows past ``sum(group_sizes)`` (written as zeros), -2 a tile
    past the real count (does nothing). Rows of a tile are ``[start, end)``, all of one expert.
    """
    e = group_sizes.shape[0]
    t_max = max_row_tiles(m, e, block_m)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    sizes = ends - starts
    tiles = (sizes + block_m - 1) // block_m
    tile_ends = jnp.cumsum(tiles)
    n_expert_tiles = tile_ends[-1]
    total = ends[-1]
    n_zero_tiles = (m - total + block_m - 1) // block_m

    t = jnp.arange(t_max, dtype=jnp.int32)
    ex = jnp.searchsorted(tile_ends, t, side="right").astype(jnp.int32)
    exc = jnp.minimum(ex, e - 1)
    local = t - (tile_ends[exc] - tiles[exc])
    row0 = starts[exc] + local * block_m
    row1 = jnp.minimum(row0 + block_m, ends[exc])
    z = t - n_expert_tiles
    zrow0 = total + z * block_m
    zrow1 = jnp.minimum(zrow0 + block_m, m)
    is_expert = t < n_expert_tiles
    is_zero = (~is_expert) & (z < n_zero_tiles)
    expert = jnp.where(is_expert, ex, jnp.where(is_zero, -1, -2))
    start = jnp.where(is_expert, row0, jnp.where(is_zero, zrow0, 0))
    end = jnp.where(is_expert, row1, jnp.where(is_zero, zrow1, 0))
    return jnp.stack([expert, start, end]).astype(jnp.int32)


# --------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and Triton launch parameters (all sizes powers of two)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    swap: bool = True  # accumulate W @ x.T ([block_n, block_m]) instead of x @ W.T
    planes: bool = False  # one dot per nibble position instead of re-interleaving (see _planes)
    splits: int = 1  # split-K: programs sharing one tile's k-blocks (any int >= 1; 1 is off)
    gemv: bool = False  # one row per tile, no matrix units: multiply-adds in registers (see _gemv)
    x_planes: bool = False  # gemv: x laid out [M, 8, in / 8], each nibble position's inputs contiguous (see _gemv)


def rows_config(n: int, k: int) -> Config:
    """One-row tiles for a weight ``[out n, in k]`` at one token (the per-row kernel's default,
    and the grouped kernel's up to 8 rows), from H100 sweeps and decode-step profiles
    (``benchmarks/RESULTS.md``): 256-input blocks of strided x, 128 outputs a tile, 8 warps and
    split-K in two for inputs of 4096 and more (K2.5's gate / up); 64 outputs, 4 warps
    otherwise. ``x_planes`` with 512-input blocks won a microbenchmark but lost inside the
    decode step (gate + up 81.7 against 71.9 us a layer, one H100 run)."""
    wide = k >= 4096
    return fit_config(Config(block_n=128 if wide else 64, block_k=256, num_warps=8 if wide else 4, num_stages=3,
                             gemv=True, splits=2 if wide else 1), n, k)


def default_config(m: int, e: int, n: int, k: int) -> Config:
    """A config by rows per expert, from a sweep at K2.5 sizes on an H100 (benchmarks/RESULTS.md).

    Up to 8 rows (one token's top-8), one-row tiles (:func:`rows_config`): on an H100 gate took
    44.6 against 50.7 us with the planes config below, down 41.0 against 52.7. Up to 16 rows
    per expert (decode) the weight reads dominate: nibble planes with 16-row tiles; few rows in
    all want long k-blocks (fewer, longer streams per program), except at 9-16 rows, where
    256-input blocks in 4 stages won, with split-K in two for the wide gate / up inputs.
    Prefill tiles are 128 x 128 with re-interleaved values (planes lose there: 8 narrow dots).
    """
    if m <= 8:
        return rows_config(n, k)
    rows_per_expert = m / max(1, min(e, m))
    if rows_per_expert <= 16:
        if m <= 16:
            cfg = Config(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4, planes=True,
                         splits=2 if k >= 4096 else 1)
        elif m <= 64:
            cfg = Config(block_m=16, block_n=64, block_k=512, num_warps=4, num_stages=3, planes=True)
        elif k >= 4096:
            cfg = Config(block_m=16, block_n=128, block_k=256, num_warps=4, num_stages=3, planes=True)
        else:
            cfg = Config(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4, planes=True)
    elif rows_per_expert <= 64:
        cfg = Config(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)
    else:
        cfg = Config(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4)
    return fit_config(cfg, n, k)


def decode_split_config(m: int, e: int, n: int, k: int, splits: int) -> Config:
    """``default_config`` with split-K over ``splits`` programs (clamped to [1, in / block_k])."""
    return fit_config(dataclasses.replace(default_config(m, e, n, k), splits=splits), n, k)


def _pow2_divisor(n: int, target: int, minimum: int) -> int:
    b = target
    while b > minimum and n % b:
        b //= 2
    if n % b:
        raise ValueError(f"no power-of-two block >= {minimum} divides {n}")
    return b


def fit_config(cfg: Config, n: int, k: int) -> Config:
    """Shrink block_n / block_k to powers of two dividing ``out`` / ``in`` (planes need k-blocks
    of at least 128 inputs, 16 words: the matrix units' smallest depth; else no planes), and
    clamp ``splits`` to [1, in / block_k] (at most one k-block per program). ``gemv`` tiles
    hold one row (block_m 1) and k-blocks of at least 32 inputs (one scale group)."""
    block_k = _pow2_divisor(k, cfg.block_k, GROUP)
    return dataclasses.replace(
        cfg, block_n=_pow2_divisor(n, cfg.block_n, 16), block_k=block_k,
        planes=cfg.planes and block_k >= 128 and not cfg.gemv, block_m=1 if cfg.gemv else cfg.block_m,
        splits=max(1, min(int(cfg.splits), k // block_k)),
    )


def _dequant_words(q_ref, s_ref, e, n0, g0, bn, groups, dtype):
    """uint32 words ``[bn, groups, 4]`` -> ``[bn, groups * 32]`` in dtype, by integer bit tricks.

    Nibble j of a word is ``q + 8``; ``0x4300 | (q + 8)`` read as bf16 is ``136 + q`` exactly,
    so W = (that - 136) * scale rounds once, as the reference. Nibbles j and j + 4 are masked
    out together, one in each 16-bit half of a word (one shift and one and-or per pair).
    """
    words = q_ref[e, pl.ds(n0, bn), pl.ds(g0, groups), :]  # [bn, groups, 4] uint32
    s = s_ref[e, pl.ds(n0, bn), pl.ds(g0, groups)].astype(dtype)[:, :, None]

    def as_value(bits16):
        return lax.bitcast_convert_type(bits16, jnp.bfloat16).astype(dtype) - jnp.asarray(136, dtype)  # = q

    n = [None] * 8
    for j in range(4):
        shifted = words >> jnp.uint32(4 * j) if j else words
        pair = (shifted & jnp.uint32(0x000F000F)) | jnp.uint32(_MAGIC * 0x10001)
        n[j] = as_value(pair.astype(jnp.uint16))  # bits 0..15: nibble j
        n[j + 4] = as_value((pair >> jnp.uint32(16)).astype(jnp.uint16))  # bits 16..31: nibble j + 4

    # Interleave the 8 nibbles of each word back into input order (j = 4 j2 + 2 j1 + j0):
    # each join adds a new minor axis, so join the highest bit first.
    p = [jnp.stack([n[j], n[j + 4]], axis=-1) for j in range(4)]  # [.., 4, j2]; p[j1 * 2 + j0]
    r = [jnp.stack([p[j0], p[2 + j0]], axis=-1) for j0 in range(2)]  # [.., 4, j2, j1]
    v = jnp.stack([r[0], r[1]], axis=-1)  # [bn, groups, 4, j2, j1, j0]
    return (v.reshape(bn, groups, GROUP) * s).reshape(bn, groups * GROUP)


def _planes(q_ref, s_ref, x_ref, e, n0, w0, rows, xmask, bn, nw, dtype, precision, swap):
    """One k-block as 8 dots, one per nibble position, with no re-interleaving of values.

    Words ``[bn, nw]`` hold inputs ``8 (w0 + c) + j``; plane j (nibble j of every word) is a
    ``[bn, nw]`` weight tile whose columns are the inputs ``8 c + j``, so it is multiplied by
    the matching strided columns of x. Every tile stays 2-D: no joins or reshapes of the
    dequantized values. The scale of word column c is that of its group, ``c // 4``.
    """
    words = q_ref[e, pl.ds(n0, bn), pl.ds(w0, nw)]  # [bn, nw] uint32
    s = _word_scales(s_ref, e, n0, w0, bn, nw).astype(dtype)
    acc = None
    for j in range(4):
        shifted = words >> jnp.uint32(4 * j) if j else words
        pair = (shifted & jnp.uint32(0x000F000F)) | jnp.uint32(_MAGIC * 0x10001)
        for jj, bits in ((j, pair.astype(jnp.uint16)), (j + 4, (pair >> jnp.uint32(16)).astype(jnp.uint16))):
            w = (lax.bitcast_convert_type(bits, jnp.bfloat16).astype(dtype) - jnp.asarray(136, dtype)) * s
            cols = 8 * (w0 + lax.broadcasted_iota(jnp.int32, (1, nw), 1)) + jj  # inputs 8 c + jj
            xj = plgpu.load(x_ref.at[rows, cols], mask=xmask, other=0)
            if swap:
                d = lax.dot_general(w, xj, (((1,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32)
            else:
                d = lax.dot_general(xj, w, (((1,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32)
            acc = d if acc is None else acc + d
    return acc


def _gemv(words, scales, x_ref, w0, row, nw, x_planes: bool = False):
    """One k-block of one row as multiply-adds: ``[bn, nw]`` float32 partial sums, summed over k later.

    Words ``[bn, nw]`` hold inputs ``8 (w0 + c) + j``. For each nibble position j, ``_nibble``
    gives ``136 + q`` as float32 and one multiply-add adds ``(136 + q) x[8 c + j]``; the offset
    and the scale are applied once per word, not per weight: ``(sum_j (136 + q_j) x_j - 136
    sum_j x_j) s``. The scale of word column c is that of its group, ``c // 4``. No matrix
    unit, so no operand shuffles: each thread keeps its words' sums in registers.
    """
    acc = xsum = None
    for j in range(8):
        if x_planes:  # x [M, 8, in / 8]: inputs 8 c + j are row j, one contiguous load
            xj = x_ref[row, j, pl.ds(w0, nw)].astype(jnp.float32)[None, :]
        else:
            cols = 8 * (w0 + lax.broadcasted_iota(jnp.int32, (1, nw), 1)) + j  # inputs 8 c + j
            xj = plgpu.load(x_ref.at[row, cols]).astype(jnp.float32)  # [1, nw]
        d = _nibble(words, j) * xj
        acc, xsum = (d, xj) if acc is None else (acc + d, xsum + xj)
    return (acc - 136.0 * xsum) * scales.astype(jnp.float32)


def _word_scales(s_ref, e, n0, w0, bn, nw):
    """The scale of each word of the tile ``[bn, nw]`` at word column ``w0``: its group's, ``c // 4``
    (the ``[bn, nw / 4]`` scales loaded as a block, then broadcast and reshaped to the words'
    shape in registers; loading them in that shape by a gathered load was slower on an H100)."""
    s = s_ref[e, pl.ds(n0, bn), pl.ds(w0 // 4, nw // 4)]  # [bn, nw / 4]
    return jnp.broadcast_to(s[:, :, None], (bn, nw // 4, 4)).reshape(bn, nw)


def _nibble(words, j):
    """Nibble j (bits 4j..4j+3, holding ``q + 8``) of uint32 words as the float32 ``136 + q``:
    moved to bits 16..19, the units of a float32 in [128, 256), under the bits of 128.0."""
    shift = 16 - 4 * j
    moved = words << jnp.uint32(shift) if shift > 0 else words >> jnp.uint32(-shift) if shift < 0 else words
    return lax.bitcast_convert_type((moved & jnp.uint32(0x000F0000)) | jnp.uint32(0x43000000), jnp.float32)


def _tile(g_ref, t, *, m: int, e: int, bm: int):
    """Row tile ``t``'s (expert, first row, end row), computed in the kernel from group_sizes.

    The same schedule as ``tile_schedule``, from a few scans and reductions over the padded
    ``[E]`` vector: no extra launches before the kernel.
    """
    ep = 1 << max(0, (e - 1).bit_length())  # Triton tensors have power-of-two sizes
    idx = lax.broadcasted_iota(jnp.int32, (ep,), 0)
    g = jnp.where(idx < e, g_ref[jnp.minimum(idx, e - 1)], 0)
    incl = jnp.cumsum(g)
    ends = jnp.minimum(incl, m)
    starts = jnp.minimum(incl - g, m)
    tiles = (ends - starts + bm - 1) // bm
    tile_ends = jnp.cumsum(tiles)
    n_expert_tiles = jnp.sum(tiles)
    total = jnp.max(ends)
    ex = jnp.sum((tile_ends <= t).astype(jnp.int32))
    sel = idx == ex

    def pick(v):
        return jnp.sum(jnp.where(sel, v, 0))

    row0 = pick(starts) + (t - (pick(tile_ends) - pick(tiles))) * bm
    row1 = jnp.minimum(row0 + bm, pick(ends))
    zrow0 = total + (t - n_expert_tiles) * bm
    zrow1 = jnp.minimum(zrow0 + bm, m)
    is_expert = t < n_expert_tiles
    is_zero = jnp.logical_and(jnp.logical_not(is_expert), zrow0 < m)
    # -1 for zero rows, -2 for nothing (no select between two constants: the Triton lowering
    # of that mistypes the result).
    expert = jnp.where(is_expert, ex, is_zero.astype(jnp.int32) - 2)
    return expert, jnp.where(is_expert, row0, zrow0), jnp.where(is_expert, row1, zrow1)


def _kernel(g_ref, layer_ref, x_ref, *refs, cfg: Config, m: int, e: int, n_k: int, precision, n_tiles: int,
            fanout: int | None):
    """Program ``(j, t[, s])``: row tile ``t`` times column tile ``j % n_tiles`` of weight
    ``j // n_tiles`` (``refs``: each weight's words, then each one's scales, then the output,
    the weights' columns side by side), over k-blocks of split ``s``.

    ``g_ref`` holds the group sizes (``fanout`` None: rows grouped by expert, tiles from
    ``_tile``) or each row's expert id (per-row mode: tile ``t`` is row ``t`` alone, reading x
    row ``t // fanout``; an id outside ``[0, E)`` makes a zero row)."""
    n_w = (len(refs) - 1) // 2
    q_refs, s_refs, o_ref = refs[:n_w], refs[n_w:2 * n_w], refs[-1]
    bm, bn = cfg.block_m, cfg.block_n
    j = pl.program_id(0)
    t = pl.program_id(1)
    if fanout is None:
        expert, row0, row1 = _tile(g_ref, t, m=m, e=e, bm=bm)
        x_row0 = row0
    else:
        ident = g_ref[t]
        expert = jnp.where(jnp.logical_and(ident >= 0, ident < e), ident, -1)
        row0, row1, x_row0 = t, t + 1, t // fanout
    if cfg.splits == 1:
        kb0, kb1, split = 0, n_k, ()
    else:  # split-K: k-blocks [s * per, min((s + 1) * per, n_k)) into float32 partials[s] (may be empty: zeros)
        s = pl.program_id(2)
        per = -(-n_k // cfg.splits)
        kb0, kb1, split = s * per, jnp.minimum(s * per + per, n_k), (s,)
    tile = functools.partial(_weight_tile, x_ref=x_ref, o_ref=o_ref, cfg=cfg, n_k=n_k, precision=precision,
                             expert=expert, stored=layer_ref[0] * e + expert, row0=row0, row1=row1, x_row0=x_row0,
                             kb0=kb0, kb1=kb1, split=split)
    if n_w == 1:
        tile(q_refs[0], s_refs[0], n0=pl.multiple_of(j * bn, bn), col0=pl.multiple_of(j * bn, bn))
        return
    for i in range(n_w):
        @pl.when(j // n_tiles == i)
        def _(i=i):
            n0 = pl.multiple_of((j - i * n_tiles) * bn, bn)
            tile(q_refs[i], s_refs[i], n0=n0, col0=pl.multiple_of(i * n_tiles * bn + n0, bn))


def _weight_tile(q_ref, s_ref, *, x_ref, o_ref, cfg: Config, n_k: int, precision, expert, stored, row0, row1,
                 x_row0, n0, col0, kb0, kb1, split):
    """One program's tile: rows ``[row0, row1)`` of expert ``expert`` (its index ``stored`` in
    q / scales) times the weight's outputs ``[n0, n0 + block_n)``, k-blocks ``[kb0, kb1)``,
    stored at output columns ``col0`` (of partials ``split`` with split-K). The rows' inputs
    are x's rows from ``x_row0`` (``row0`` but in per-row mode, which runs one-row tiles)."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    groups = bk // GROUP
    rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    dtype = x_ref.dtype
    out = o_ref.at[(*split, pl.ds(row0, bm), pl.ds(col0, bn))]

    if cfg.gemv:  # one row: [bn, bk / 8] products in float32, summed over the words at the end
        nw = bk // 8
        x_rows = x_row0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)

        @pl.when(expert >= 0)
        def _():
            def body(kb, acc):
                w0 = kb * nw
                words, scales = q_ref[stored, pl.ds(n0, bn), pl.ds(w0, nw)], _word_scales(s_ref, stored, n0, w0, bn, nw)
                return acc + _gemv(words, scales, x_ref, w0, x_row0 if cfg.x_planes else x_rows, nw, cfg.x_planes)

            acc = lax.fori_loop(kb0, kb1, body, jnp.zeros((bn, nw), jnp.float32))
            plgpu.store(out, jnp.sum(acc, axis=1)[None, :].astype(o_ref.dtype))

    else:
        @pl.when(expert >= 0)
        def _():
            xmask = jnp.broadcast_to(rows < row1, (bm, bk // 8 if cfg.planes else bk))

            def body(kb, acc):
                if cfg.planes:
                    return acc + _planes(q_ref, s_ref, x_ref, stored, n0, kb * (bk // 8), rows, xmask, bn, bk // 8,
                                         dtype, precision, cfg.swap)
                k0 = pl.multiple_of(kb * bk, bk)
                xk = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=xmask, other=0)
                w = _dequant_words(q_ref, s_ref, stored, n0, kb * groups, bn, groups, dtype)
                if cfg.swap:
                    d = lax.dot_general(w, xk, (((1,), (1,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)
                else:
                    d = lax.dot_general(xk, w, (((1,), (1,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)
                return acc + d

            shape = (bn, bm) if cfg.swap else (bm, bn)
            acc = lax.fori_loop(kb0, kb1, body, jnp.zeros(shape, jnp.float32))
            y = (acc.T if cfg.swap else acc).astype(o_ref.dtype)
            plgpu.store(out, y, mask=jnp.broadcast_to(rows < row1, (bm, bn)))

    @pl.when(expert == -1)
    def _():
        plgpu.store(out, jnp.zeros((bm, bn), o_ref.dtype), mask=jnp.broadcast_to(rows < row1, (bm, bn)))


def int4_grouped_matmul(
    x: jax.Array,
    q: jax.Array,
    scales: jax.Array,
    group_sizes: jax.Array,
    *,
    config: Config | None = None,
    interpret: bool = False,
    layer: jax.Array | None = None,
) -> jax.Array:
    """``x [M, in]`` rows grouped by expert, times their expert's dequantized W.T -> ``[M, out]``.

    ``q`` uint32 words ``[E, out, in/8]``; ``scales`` ``[E, out, in/32]``; ``group_sizes``
    int32 ``[E]``, sum <= M (rows past it are zeros). With ``layer`` (int32), ``q`` and
    ``scales`` are a run's stack ``[L, E, ...]`` and layer ``layer``'s experts are read in
    place (no slice is copied). ``interpret=True`` runs the same kernel body through Pallas'
    interpreter (CPU tests).
    """
    return int4_grouped_matmuls(x, (q,), (scales,), group_sizes, config=config, interpret=interpret, layer=layer)[0]


def int4_grouped_matmuls(
    x: jax.Array,
    qs,
    scales,
    group_sizes: jax.Array,
    *,
    config: Config | None = None,
    interpret: bool = False,
    layer: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """:func:`int4_grouped_matmul` of the same rows with several weights of one shape (a SwiGLU's
    gate and up) in one launch: their column tiles side by side on the grid, one output (or
    partials) buffer. A tuple of ``[M, out]``, one per weight of ``qs`` / ``scales``."""
    x, qs, scales, layer, e = _operands("int4_grouped_matmul", x, qs, scales, layer)
    m, k = x.shape
    n = qs[0].shape[1]
    if group_sizes.shape != (e,):
        raise ValueError(f"int4_grouped_matmul: group_sizes {group_sizes.shape} must be [{e}]")
    cfg = fit_config(config, n, k) if config is not None else default_config(m, e, n, k)
    _check_outputs("int4_grouped_matmul", m, len(qs) * n, cfg)
    return _call(x, qs, scales, group_sizes, layer, cfg=cfg, interpret=interpret, fanout=None, e=e)


def int4_rows_matmuls(
    x: jax.Array,
    qs,
    scales,
    experts: jax.Array,
    *,
    fanout: int = 1,
    config: Config | None = None,
    interpret: bool = False,
    layer: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Per-row INT4 matmuls: ``y[r] = x[r // fanout] @ W[experts[r]].T`` for each weight of
    ``qs`` / ``scales`` (as :func:`int4_grouped_matmuls`), in one launch.

    For a few rows (decoding a token or two): no rows are sorted or gathered by expert and no
    schedule is derived; each program reads its row's expert id and streams that expert's
    weights. A row whose id is outside ``[0, E)`` (an idle slot's) reads nothing and is zeros.
    Rows sharing an expert each read its weights, so for many rows the grouped kernel, which
    reads each expert once, is the one to use. ``x`` ``[M / fanout, in]`` (a token's
    ``fanout`` = top-k copies share its row); ``experts`` int ``[M]``; ``layer`` as
    :func:`int4_grouped_matmul`. ``config`` must be one-row (``gemv``); default
    :func:`rows_config`. A tuple of ``[M, out]``.
    """
    x, qs, scales, layer, e = _operands("int4_rows_matmul", x, qs, scales, layer)
    if experts.ndim != 1 or not jnp.issubdtype(experts.dtype, jnp.integer):
        raise ValueError(f"int4_rows_matmul: experts must be integer ids [M], got {experts.dtype} {experts.shape}")
    if not isinstance(fanout, int) or fanout < 1 or experts.shape[0] != x.shape[0] * fanout:
        raise ValueError(f"int4_rows_matmul: {experts.shape[0]} expert ids for x {x.shape} with fanout {fanout!r} "
                         f"(need x rows * fanout)")
    m, k, n = experts.shape[0], x.shape[1], qs[0].shape[1]
    if config is not None and not config.gemv:
        raise ValueError(f"int4_rows_matmul: per-row tiles need a one-row config (gemv=True), got {config}")
    cfg = fit_config(config, n, k) if config is not None else rows_config(n, k)
    _check_outputs("int4_rows_matmul", m, len(qs) * n, cfg)
    return _call(x, qs, scales, experts.astype(jnp.int32), layer, cfg=cfg, interpret=interpret, fanout=fanout, e=e)


def _operands(name: str, x, qs, scales, layer):
    """Checked operands of a call: ``(x, qs, scales, layer, E)``. With ``layer``, each stack
    ``[L, E, ...]`` is viewed as ``[L * E, ...]`` (layer ``l``'s experts from ``l * E``);
    ``layer`` becomes int32 ``[1]`` (0 without one: the kernel multiplies it by ``E``, which is
    the experts of one layer)."""
    qs, scales = tuple(qs), tuple(scales)
    if not qs or len(qs) != len(scales):
        raise ValueError(f"{name}: {len(qs)} word arrays and {len(scales)} scale arrays")
    if any(a.shape != qs[0].shape for a in qs) or any(a.shape != scales[0].shape for a in scales):
        raise ValueError(f"{name}: the weights differ in shape: {[a.shape for a in qs]}")
    index = jnp.zeros((1,), jnp.int32)
    q, sc = qs[0], scales[0]
    e = q.shape[0]
    if layer is not None:
        if q.ndim != 4 or sc.ndim != 4:
            raise ValueError(f"{name}: with a layer, q {q.shape} / scales {sc.shape} must be [L, E, ...]")
        e = q.shape[1]
        index = jnp.asarray(layer, jnp.int32).reshape(1)  # a free reshape: no launch before the kernel
        qs = tuple(a.reshape(-1, *a.shape[2:]) for a in qs)  # free: [L * E, ...]
        scales = tuple(a.reshape(-1, *a.shape[2:]) for a in scales)
        q, sc = qs[0], scales[0]
    if q.dtype != jnp.uint32 or q.ndim != 3 or any(a.dtype != jnp.uint32 for a in qs):
        raise ValueError(f"{name}: q must be uint32 words [E, out, in/8], got {q.dtype} {q.shape}")
    n, kw = q.shape[1:]
    k = x.shape[-1]
    if x.ndim != 2 or kw * 8 != k:
        raise ValueError(f"{name}: q {q.shape} (8 inputs per word) does not match x {x.shape}")
    if k % GROUP or sc.shape != (q.shape[0], n, k // GROUP):
        raise ValueError(f"{name}: scales {sc.shape} do not match q {q.shape} (one per {GROUP})")
    if x.size >= 2**31:  # q, scales (a whole stack): 64-bit offsets past 4 GiB
        raise ValueError(f"{name}: x has {x.size} elements; the kernel addresses at most 2^31 - 1")
    return x, qs, scales, index, e


def _check_outputs(name: str, m: int, width: int, cfg: Config) -> None:
    """The output (or split-K partials) ``[m, width]`` within the kernel's 32-bit addressing."""
    if m * width >= 2**31:
        raise ValueError(f"{name}: the output has {m * width} elements; the kernel addresses at most 2^31 - 1")
    if cfg.splits * m * width >= 2**31:
        raise ValueError(f"{name}: {cfg.splits} split-K partials of [{m}, {width}] exceed 2^31 - 1 elements")


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "fanout", "e"))
def _call(x, qs, scales, g, layer, *, cfg: Config, interpret: bool, fanout: int | None, e: int):
    """The launch. ``g``: group sizes [E] (``fanout`` None), or per-row expert ids [M]."""
    k, n, n_w = x.shape[1], qs[0].shape[1], len(qs)
    if fanout is None:
        m = x.shape[0]
        t_max = max_row_tiles(m, e, cfg.block_m)
    else:
        m = t_max = g.shape[0]
    # Unless planes or gemv: a view that keeps one scale group (4 words) on its own axis (a free reshape).
    if not (cfg.planes or cfg.gemv):
        qs = tuple(q.reshape(q.shape[0], n, k // GROUP, GROUP // 8) for q in qs)
    if cfg.gemv and cfg.x_planes:  # [M, 8, in / 8]: x[r, j, c] is input 8 c + j
        x = x.reshape(x.shape[0], k // 8, 8).swapaxes(1, 2)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    n_tiles = n // cfg.block_n
    kernel = functools.partial(_kernel, cfg=cfg, m=m, e=e, n_k=k // cfg.block_k, precision=precision, n_tiles=n_tiles,
                               fanout=fanout)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    operands = (g.astype(jnp.int32), layer, x, *qs, *scales)
    if cfg.splits == 1:
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((m, n_w * n), x.dtype),
            grid=(n_w * n_tiles, t_max),
            interpret=interpret,
            compiler_params=compiler_params,
            name="int4_grouped_matmul" if fanout is None else "int4_rows_matmul",
        )(*operands)
        return tuple(out[:, i * n:(i + 1) * n] for i in range(n_w))
    partials = pl.pallas_call(  # split-K: float32 [splits, M, N], summed after the kernel
        kernel,
        out_shape=jax.ShapeDtypeStruct((cfg.splits, m, n_w * n), jnp.float32),
        grid=(n_w * n_tiles, t_max, cfg.splits),
        interpret=interpret,
        compiler_params=compiler_params,
        name="int4_grouped_matmul_splitk" if fanout is None else "int4_rows_matmul_splitk",
    )(*operands)
    return tuple(partials[:, :, i * n:(i + 1) * n].sum(0).astype(x.dtype) for i in range(n_w))


def expert_bytes(q: jax.Array, scales: jax.Array, group_sizes: Any) -> int:
    """Bytes of the words + scales of the experts that have rows (what a call must read)."""
    used = int(np.count_nonzero(np.asarray(group_sizes)))
    per_expert = (q.size * q.dtype.itemsize + scales.size * scales.dtype.itemsize) // q.shape[0]
    return used * per_expert
