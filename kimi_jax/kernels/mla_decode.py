"""Absorbed MLA attention over the compressed cache, split-K (FlashMLA-style), in Pallas' Triton lowering.

Einsum letters: L layers of a stacked cache, B batch, T query positions, N heads, S cache
slots, C kv latent (kv_lora_rank), R rope dim; a "row" is one (query, head) pair, T*N of
them per batch row, row ``t * N + n``.

    scores[b, n, t, s] = scale * (q[b, t, n] . c_kv[r, layer, s] + q_pe[b, t, n] . k_pe[r, layer, s]),  r = rows[b]
    out[b, t, n] = softmax_s(scores[b, n, t, s] over s <= positions[b, t]) @ c_kv[r, layer, s]

Layout: ``q`` [B, T, N, C], ``q_pe`` [B, T, N, R], the stacked cache ``c_kv`` [Bc, L, S, C]
and ``k_pe`` [Bc, L, S, R] (``kimi_jax.model.cache``; L = 1 for a single layer), a traced int32 ``layer`` (clamped to
[0, L)), ``positions`` [B, T] int32 and ``rows`` [B] int32, the cache sequence each batch row
attends over (default ``0 .. B - 1``; clamped to [0, Bc)): a decode step of a few running
sequences of a larger cache reads only theirs. Returns float32 [B, T, N, C]. A query sees slot s iff
``s <= position``; a query that sees no slot (negative position) gets zeros, in the kernel and
in :func:`mla_decode_reference` alike. The cache is cast to q's dtype in registers; dots take
q's dtype with float32 accumulation; softmax statistics and the output are float32 (bf16
inputs: the probabilities are rounded to bf16 for the value product, as the MLA math does).

What it reads (the floor): per batch row only the slots below ``kv_len = min(S, max_t
positions[b, t] + 1)`` of the chosen layer, each once from HBM, (C + R) values per slot,
plus q. Slots past ``kv_len``, other sequences and other layers are never read; no copy of
the layer's slice is made: ``layer`` is an int32 [1] operand (and ``rows`` an int32 [B] one)
that each program loads and indexes the stacked arrays with (the Triton lowering has no scalar prefetch).

Design. Two launches.

1. Split kernel, grid ``(row_blocks, splits, B)`` (row blocks fastest, so the programs that
   share a batch row's cache blocks run together). Batch row b's ``nb = cdiv(kv_len,
   block_s)`` visible blocks are shared among its splits, ``per = max(cdiv(nb, splits),
   min(cdiv(min_split_slots, block_s), cdiv(nb, MIN_SPLITS)))`` blocks each (at least
   ``min_split_slots`` slots, except that up to ``MIN_SPLITS`` splits share a short row), so
   the number of splits used shrinks with the visible length (``cdiv(nb, per)``) and the
   splits past it exit at once. A program
   holds ``block_rows`` rows of q ([block_rows, C + R]) and walks its blocks: it loads
   ``c_kv`` [block_s, C] and ``k_pe`` [block_s, R] (C in ``block_c`` column chunks), scores
   all its rows against them (each row masked by its own position), and updates an online
   softmax (running max and sum per row, accumulator [block_rows, C] float32, in chunks). It
   writes its partial (max, sum, accumulator) unnormalized.
2. Combine kernel, grid ``(C / columns, rows / tile rows, B)``: for its tile of rows and
   columns, rescales and sums the partials of the used splits only (``cdiv(nb, per)``,
   recomputed from positions), up to 16 splits per load, and divides by the summed softmax
   denominators.

Row blocks: K2.5 decode has T*N = 64 rows. With 32-row blocks (the default below batch 8,
:func:`tuned_config`) both row blocks read the same cache blocks, so HBM sees one pass only
while the row blocks of a split run together and share them through L2 (twice the L2-to-SM
traffic). A 64-row block (the default from batch 8) reads each block once, but its [64, 512]
float32 accumulator is 128 registers per thread at 8 warps, and Pallas' dot has no
accumulator operand, so ``acc * alpha + dot(p, v)`` holds the dot's result beside the
accumulator (the ``block_c`` chunks bound that extra to one [rows, block_c] tile). Both are
in the benchmark's sweep.

The partials cost ``splits * rows * C * 4`` bytes written and read back: at batch 1 with 64
rows and the default 66 splits that is 8.7 MB against 37.7 MB of cache at 32K slots (mostly
L2 traffic); ``min_split_slots`` bounds it relative to the cache read.

Limits: C and R powers of two >= 16; ``block_s``, ``block_rows`` and ``block_c`` powers of
two >= 16; rows are padded to ``block_rows`` (padded rows are computed and dropped). The
Triton lowering uses 64-bit element offsets for operands over 4 GiB.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas API; absent in some jax builds.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

NUM_SMS = 132  # streaming multiprocessors of an H100 SXM / H200
MIN_SPLIT_SLOTS = 256  # fewest cache slots a split is given (bounds the partials' bytes)...
MIN_SPLITS = 4  # ...but a row of fewer blocks than this many splits' worth still uses this many
BLOCK_S, BLOCK_ROWS = 32, 32  # default cache slots per step, query rows per program
_LOG2E = math.log2(math.e)
_LOWEST = float(jnp.finfo(jnp.float32).min)


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def mla_decode_reference(q, q_pe, c_kv, k_pe, layer, positions, *, scale: float, rows=None) -> jax.Array:
    """The definition in plain JAX (float32 scores, softmax and value product): float32 [B, T, N, C]."""
    hi = lax.Precision.HIGHEST
    if rows is not None:
        c_kv, k_pe = c_kv[rows], k_pe[rows]
    ckv = lax.dynamic_index_in_dim(c_kv, layer, 1, keepdims=False).astype(q.dtype)
    kpe = lax.dynamic_index_in_dim(k_pe, layer, 1, keepdims=False).astype(q.dtype)
    scores = jnp.einsum("btnc,bsc->bnts", q, ckv, precision=hi, preferred_element_type=jnp.float32)
    scores += jnp.einsum("btnr,bsr->bnts", q_pe, kpe, precision=hi, preferred_element_type=jnp.float32)
    visible = (jnp.arange(ckv.shape[1]) <= positions[..., None])[:, None]  # [B, 1, T, S]
    scores = jnp.where(visible, scores * scale, _LOWEST)
    e = jnp.where(visible, jnp.exp(scores - scores.max(-1, keepdims=True)), 0.0)
    total = e.sum(-1, keepdims=True)
    probs = e / jnp.where(total > 0, total, 1.0)  # a query that sees nothing: zeros
    return jnp.einsum("bnts,bsc->btnc", probs, ckv.astype(jnp.float32), precision=hi)


def auto_splits(batch: int, rows: int, slots: int, *, block_rows: int = BLOCK_ROWS, block_s: int = BLOCK_S,
                min_split_slots: int = MIN_SPLIT_SLOTS, num_sms: int = NUM_SMS) -> int:
    """The default (static) number of splits for ``rows`` = T*N query rows per batch row.

    One wave of programs over the GPU: ``num_sms // (batch * row_blocks)`` (at least 1),
    capped at the splits a full cache of ``slots`` can use: ``cdiv(cdiv(slots, block_s),
    cdiv(min_split_slots, block_s))``, or ``MIN_SPLITS`` if more. At run time each split gets
    at least ``min_split_slots`` of the visible slots (see :func:`_share`), so short rows use
    fewer splits than this.
    """
    row_blocks = _cdiv(rows, min(block_rows, _pow2_at_least(rows, 16)))
    want = max(1, num_sms // (batch * row_blocks))
    blocks = _cdiv(slots, block_s)
    most = max(_cdiv(blocks, _cdiv(min_split_slots, block_s)), min(blocks, MIN_SPLITS))
    return max(1, min(want, most))


def _visible(pos_ref, b, *, T: int, S: int):
    """``kv_len`` of batch row b: min(S, furthest position + 1), at least 0."""
    if T == 1:
        furthest = pos_ref[b, 0]
    else:
        t = lax.broadcasted_iota(jnp.int32, (_pow2_at_least(T, 1),), 0)
        furthest = jnp.max(plgpu.load(pos_ref.at[b, jnp.minimum(t, T - 1)], mask=t < T, other=-1))
    return jnp.clip(furthest + 1, 0, S)


def _share(kv_len, splits: int, block_s: int, min_blocks: int):
    """Blocks per split and the number of splits used, for ``kv_len`` visible slots: at least
    ``min_blocks`` blocks a split, but up to ``MIN_SPLITS`` splits for a row of fewer blocks
    than ``MIN_SPLITS * min_blocks`` (latency, not the partials' bytes, bounds a short row:
    on an H100 a row of about 140 slots took 7.0 us in 3 splits against 11.9 in 1)."""
    nb = _cdiv(kv_len, block_s)
    per = jnp.maximum(jnp.maximum(_cdiv(nb, splits), jnp.minimum(min_blocks, _cdiv(nb, MIN_SPLITS))), 1)
    return per, _cdiv(nb, per)


def _split_kernel(layer_ref, rows_ref, pos_ref, q_ref, qpe_ref, ckv_ref, kpe_ref, acc_ref, m_ref, l_ref, *,
                  T: int, N: int, S: int, L: int, Bc: int, splits: int, block_s: int, block_rows: int, block_c: int,
                  min_blocks: int, scale: float, precision):
    rb, sp, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bs, br, bc = block_s, block_rows, block_c
    C, R = q_ref.shape[-1], qpe_ref.shape[-1]
    chunks = range(C // bc)
    dtype = q_ref.dtype
    kv_len = _visible(pos_ref, b, T=T, S=S)
    per, _ = _share(kv_len, splits, bs, min_blocks)
    lo = sp * per
    hi = jnp.minimum(lo + per, _cdiv(kv_len, bs))

    @pl.when(lo < hi)
    def _():
        layer = jnp.clip(layer_ref[0], 0, L - 1)
        seq = jnp.clip(rows_ref[b], 0, Bc - 1)
        r0 = rb * br
        rows = r0 + lax.broadcasted_iota(jnp.int32, (br,), 0)
        valid = rows < T * N
        if T == 1:
            pos = jnp.where(valid, pos_ref[b, 0], -1)
        else:
            pos = plgpu.load(pos_ref.at[b, jnp.minimum(rows // N, T - 1)], mask=valid, other=-1)

        def rows_of(ref, c0, width):
            return plgpu.load(ref.at[b, pl.ds(r0, br), pl.ds(c0, width)],
                              mask=jnp.broadcast_to(valid[:, None], (br, width)), other=0)

        q = [rows_of(q_ref, k * bc, bc) for k in chunks]
        q_pe = rows_of(qpe_ref, 0, R)
        nt = (((1,), (1,)), ((), ()))

        def visit(j, carry):
            m, total, *acc = carry
            s0 = pl.multiple_of(j * bs, bs)
            slots = s0 + lax.broadcasted_iota(jnp.int32, (bs,), 0)
            inside = slots[:, None] < kv_len

            def slots_of(ref, c0, width):
                return plgpu.load(ref.at[seq, layer, pl.ds(s0, bs), pl.ds(c0, width)],
                                  mask=jnp.broadcast_to(inside, (bs, width)), other=0).astype(dtype)

            kv = [slots_of(ckv_ref, k * bc, bc) for k in chunks]
            s = lax.dot_general(q_pe, slots_of(kpe_ref, 0, R), nt, precision=precision,
                                preferred_element_type=jnp.float32)
            for qk, kvk in zip(q, kv):
                s += lax.dot_general(qk, kvk, nt, precision=precision, preferred_element_type=jnp.float32)
            seen = slots[None, :] <= pos[:, None]
            s = jnp.where(seen, s * (scale * _LOG2E), _LOWEST)  # log2 units: exp2 below
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.where(seen, jnp.exp2(s - m_new[:, None]), 0.0)
            alpha = jnp.exp2(m - m_new)
            p16 = p.astype(dtype)
            acc = [a * alpha[:, None] + lax.dot_general(p16, kvk, (((1,), (0,)), ((), ())), precision=precision,
                                                        preferred_element_type=jnp.float32)
                   for a, kvk in zip(acc, kv)]
            return (m_new, total * alpha + jnp.sum(p, axis=1), *acc)

        init = (jnp.full((br,), _LOWEST, jnp.float32), jnp.zeros((br,), jnp.float32),
                *(jnp.zeros((br, bc), jnp.float32) for _ in chunks))
        m, total, *acc = lax.fori_loop(lo, hi, visit, init)
        for k, a in enumerate(acc):
            plgpu.store(acc_ref.at[b, sp, pl.ds(r0, br), pl.ds(k * bc, bc)], a)
        plgpu.store(m_ref.at[b, sp, pl.ds(r0, br)], m)
        plgpu.store(l_ref.at[b, sp, pl.ds(r0, br)], total)


def _combine_kernel(pos_ref, acc_ref, m_ref, l_ref, o_ref, *, T: int, N: int, S: int, splits: int,
                    block_s: int, min_blocks: int, block_splits: int, block_rows: int, block_c: int):
    cb, rb, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sc, br, bc = block_splits, block_rows, block_c
    _, used = _share(_visible(pos_ref, b, T=T, S=S), splits, block_s, min_blocks)
    r0, c0 = rb * br, cb * bc

    def add(i, carry):
        m, den, out = carry
        s0 = i * sc
        live = (s0 + lax.broadcasted_iota(jnp.int32, (sc, 1), 0)) < used
        m_s = plgpu.load(m_ref.at[b, pl.ds(s0, sc), pl.ds(r0, br)], mask=jnp.broadcast_to(live, (sc, br)),
                         other=_LOWEST)
        l_s = plgpu.load(l_ref.at[b, pl.ds(s0, sc), pl.ds(r0, br)], mask=jnp.broadcast_to(live, (sc, br)), other=0)
        acc = plgpu.load(acc_ref.at[b, pl.ds(s0, sc), pl.ds(r0, br), pl.ds(c0, bc)],
                         mask=jnp.broadcast_to(live[:, :, None], (sc, br, bc)), other=0)
        m_new = jnp.maximum(m, jnp.max(m_s, axis=0))
        alpha, w = jnp.exp2(m - m_new), jnp.exp2(m_s - m_new[None])
        return (m_new, den * alpha + jnp.sum(w * l_s, axis=0),
                out * alpha[:, None] + jnp.sum(w[:, :, None] * acc, axis=0))

    init = (jnp.full((br,), _LOWEST, jnp.float32), jnp.zeros((br,), jnp.float32), jnp.zeros((br, bc), jnp.float32))
    _, den, out = lax.fori_loop(0, _cdiv(used, sc), add, init)
    out = jnp.where(den[:, None] > 0, out / jnp.where(den > 0, den, 1.0)[:, None], 0.0)
    rows = r0 + lax.broadcasted_iota(jnp.int32, (br,), 0)
    plgpu.store(o_ref.at[b, pl.ds(r0, br), pl.ds(c0, bc)], out.astype(o_ref.dtype),
                mask=jnp.broadcast_to((rows < T * N)[:, None], (br, bc)))


def _combine_blocks(batch: int, splits: int, rows_pad: int, c: int) -> tuple[int, int, int]:
    """Combine tiles (splits, rows, columns): up to 16 splits per load; [16, 128] output tiles
    shrunk (columns to 32, then rows to 8) to about 4096 values per load and two programs per SM."""
    sc, br, bc = min(16, _pow2_at_least(splits, 1)), 16, min(128, c)
    while (sc * br * bc > 4096 or batch * (rows_pad // br) * (c // bc) < 2 * NUM_SMS) and (bc > 32 or br > 8):
        if bc > 32:
            bc //= 2
        else:
            br //= 2
    return sc, br, bc


def fits(latent: int, rope: int) -> bool:
    """Whether the kernel takes a model's kv latent and rope widths (powers of two >= 16)."""
    return all(n >= 16 and not n & (n - 1) for n in (latent, rope))


def tuned_config(batch: int) -> dict:
    """Block sizes measured best on an H100 at 32K cached tokens (``benchmarks/mla_decode.py
    --sweep``): 64-row blocks with 256-column dots from batch 8 (63-67% of the copy bandwidth
    at batch 32), below that 4 warps on 32-row blocks with 3 stages (42% at batch 1 against 34%
    with 2: one 4-warp program per SM, whose loads and dots wait on each other; 37.7 MB of
    cache take 14 us at the floor)."""
    if batch >= 8:
        return dict(block_s=64, block_rows=64, block_c=256, num_warps=8, num_stages=2)
    return dict(block_s=64, block_rows=BLOCK_ROWS, block_c=128, num_warps=4, num_stages=3)


def mla_decode(q, q_pe, c_kv, k_pe, layer, positions, *, scale: float, rows=None, block_s: int | None = None,
               block_rows: int | None = None, block_c: int | None = None, splits: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None, min_split_slots: int = MIN_SPLIT_SLOTS,
               out_dtype=jnp.float32, interpret: bool = False) -> jax.Array:
    """Absorbed MLA attention of ``q`` / ``q_pe`` over layer ``layer`` of the stacked cache's
    sequences ``rows`` [B] (default the first B): [B, T, N, C] in ``out_dtype`` (the float32
    result rounded once, by the combine kernel).

    ``block_s`` cache slots per step of a program; ``block_rows`` query rows per program (at
    most T*N rounded up to a power of two); ``block_c`` accumulator columns per dot; ``splits``
    the most programs per (batch row, row block), default :func:`auto_splits`; each split gets
    at least ``min_split_slots`` visible slots; ``num_warps`` and ``num_stages`` are Triton's.
    Unset sizes come from :func:`tuned_config`. ``interpret=True`` runs the kernel bodies in
    Pallas' interpreter (CPU tests).
    """
    B, T, N, C = q.shape
    given = dict(block_s=block_s, block_rows=block_rows, block_c=block_c, num_warps=num_warps, num_stages=num_stages)
    chosen = {k: v if v is not None else tuned_config(B)[k] for k, v in given.items()}
    block_s, block_rows, block_c = chosen["block_s"], chosen["block_rows"], chosen["block_c"]
    num_warps, num_stages = chosen["num_warps"], chosen["num_stages"]
    Bc, L, S, R = c_kv.shape[0], c_kv.shape[1], c_kv.shape[2], k_pe.shape[-1]
    if c_kv.shape != (Bc, L, S, C) or k_pe.shape != (Bc, L, S, R) or q_pe.shape != (B, T, N, R):
        raise ValueError(f"mla_decode: shapes do not match: q {q.shape}, q_pe {q_pe.shape}, "
                         f"c_kv {c_kv.shape} (want [Bc, L, S, C]), k_pe {k_pe.shape} (want [Bc, L, S, R])")
    if positions.shape != (B, T):
        raise ValueError(f"mla_decode: positions {positions.shape} must be [B, T] = {(B, T)}")
    if rows is None:
        if Bc < B:
            raise ValueError(f"mla_decode: the cache holds {Bc} sequences, fewer than the {B} batch rows (pass rows)")
        rows = jnp.arange(B, dtype=jnp.int32)
    elif jnp.shape(rows) != (B,):
        raise ValueError(f"mla_decode: rows {jnp.shape(rows)} must be [B] = {(B,)}")
    for name, n in (("C", C), ("R", R), ("block_s", block_s), ("block_rows", block_rows), ("block_c", block_c)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"mla_decode: {name} = {n} must be a power of two >= 16")
    block_rows = min(block_rows, _pow2_at_least(T * N, 16))
    splits = splits or auto_splits(B, T * N, S, block_rows=block_rows, block_s=block_s,
                                   min_split_slots=min_split_slots)
    out = _call(q.reshape(B, T * N, C), q_pe.reshape(B, T * N, R), c_kv, k_pe, jnp.asarray(layer, jnp.int32).reshape(1),
                jnp.asarray(rows, jnp.int32), positions.astype(jnp.int32), T=T, N=N, scale=float(scale),
                block_s=block_s, block_rows=block_rows,
                block_c=min(block_c, C), splits=splits, num_warps=num_warps, num_stages=num_stages,
                min_blocks=_cdiv(min_split_slots, block_s), out_dtype=jnp.dtype(out_dtype), interpret=interpret)
    return out.reshape(B, T, N, C)


@functools.partial(jax.jit, static_argnames=("T", "N", "scale", "block_s", "block_rows", "block_c", "splits",
                                             "num_warps", "num_stages", "min_blocks", "out_dtype", "interpret"))
def _call(q, q_pe, c_kv, k_pe, layer, rows, positions, *, T, N, scale, block_s, block_rows, block_c, splits,
          num_warps, num_stages, min_blocks, out_dtype, interpret):
    Bc, L, S, C = c_kv.shape
    B = q.shape[0]
    rows_pad = _cdiv(T * N, block_rows) * block_rows
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    common = dict(T=T, N=N, S=S, splits=splits, block_s=block_s, min_blocks=min_blocks)
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    acc, m, total = pl.pallas_call(
        functools.partial(_split_kernel, L=L, Bc=Bc, block_rows=block_rows, block_c=block_c, scale=scale,
                          precision=precision, **common),
        out_shape=(jax.ShapeDtypeStruct((B, splits, rows_pad, C), jnp.float32),
                   jax.ShapeDtypeStruct((B, splits, rows_pad), jnp.float32),
                   jax.ShapeDtypeStruct((B, splits, rows_pad), jnp.float32)),
        grid=(rows_pad // block_rows, splits, B),
        interpret=interpret,
        compiler_params=params,
        name="mla_decode_split",
    )(layer, rows, positions, q, q_pe, c_kv, k_pe)
    sc, cbr, cbc = _combine_blocks(B, splits, rows_pad, C)
    params = None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        functools.partial(_combine_kernel, block_splits=sc, block_rows=cbr, block_c=cbc, **common),
        out_shape=jax.ShapeDtypeStruct((B, T * N, C), out_dtype),
        grid=(C // cbc, rows_pad // cbr, B),
        interpret=interpret,
        compiler_params=params,
        name="mla_decode_combine",
    )(positions, acc, m, total)
