"""The fused INT4 grouped matmul in Pallas' interpreter against the reference path
(``int4_ragged_dot``: dequantize, then ``jax.lax.ragged_dot``)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.kernels import int4_grouped as ig
from kimi_jax.quant.formats import int4_ragged_dot, pack_words

# Pairwise-distinct sizes: experts, out, in (in a multiple of 32 scales and of block_k).
E, N, K = 6, 48, 128
SMALL = ig.Config(block_m=16, block_n=16, block_k=64)


def _inputs(seed, m, dtype, k=K):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    q = pack_words(jnp.asarray(rng.integers(-8, 8, (E, N, k)), jnp.int4))
    scales = jnp.asarray(rng.uniform(0.005, 0.05, (E, N, k // ig.GROUP)), jnp.bfloat16)
    return x, q, scales


def _rel(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


# Uneven group sizes with several experts empty: ends inside / on / across 16-row tiles,
# a sum below M (the rows past it must be zeros), one expert holding every row.
GROUPS = [
    [3, 0, 17, 0, 5, 0],
    [0, 0, 33, 1, 0, 16],
    [0, 0, 0, 0, 0, 40],
    [1, 2, 3, 4, 5, 6],
]


PLANES = ig.Config(block_m=16, block_n=16, block_k=128, planes=True)
GEMV = ig.Config(block_n=16, block_k=64, gemv=True)  # fit_config makes its tiles one row


@pytest.mark.parametrize(("groups", "cfg"), [(g, SMALL) for g in GROUPS] + [(g, PLANES) for g in GROUPS[:2]]
                         + [(g, GEMV) for g in GROUPS[:2]] + [(GROUPS[0], dataclasses.replace(GEMV, x_planes=True))])
def test_float32_matches_reference(groups, cfg):
    m = 41
    x, q, scales = _inputs(sum(groups), m, jnp.float32)
    gs = jnp.asarray(groups, jnp.int32)
    ref = int4_ragged_dot(x, q, scales, gs)
    y = jax.block_until_ready(ig.int4_grouped_matmul(x, q, scales, gs, config=cfg, interpret=True))
    assert y.shape == (m, N) and y.dtype == jnp.float32
    assert _rel(y, ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(y)[sum(groups):], 0.0)  # rows past the sum


@pytest.mark.parametrize(("swap", "planes", "gemv"), [
    (True, False, False), (False, False, False), (True, True, False), (True, False, True)])
def test_bfloat16_matches_reference(swap, planes, gemv):
    groups = [7, 0, 20, 0, 2, 19]
    x, q, scales = _inputs(1, 50, jnp.bfloat16)
    gs = jnp.asarray(groups, jnp.int32)
    ref = int4_ragged_dot(x, q, scales, gs)
    cfg = ig.Config(block_m=16, block_n=16, block_k=128 if planes else 32, swap=swap, planes=planes, gemv=gemv)
    y = ig.int4_grouped_matmul(x, q, scales, gs, config=cfg, interpret=True)
    assert y.dtype == jnp.bfloat16
    assert _rel(y, ref) < 1e-2  # bf16 rounding of the output, float32 accumulation order
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32))[sum(groups):], 0.0)


def test_dequantization_is_exact():
    """W is q * scale rounded once to x's dtype, as the reference.

    One-hot rows of x pick single input columns, so y = W.T exactly (one product each); the
    expected W is built from the words' nibbles (input 8k + j: bits 4j..4j+3 of word k, q + 8).
    """
    x = jnp.eye(K, dtype=jnp.bfloat16)[: 2 * 32]
    _, q, scales = _inputs(2, 1, jnp.bfloat16)
    gs = jnp.asarray([0, 32, 0, 32, 0, 0], jnp.int32)
    words = np.asarray(q, np.int64)
    values = np.stack([((words >> (4 * j)) & 0xF) - 8 for j in range(8)], axis=-1).reshape(E, N, K)
    w = (jnp.asarray(values, jnp.bfloat16).reshape(E, N, K // 32, 32) * scales[..., None]).reshape(E, N, K)
    want = np.concatenate([np.asarray(w[1, :, :32].T), np.asarray(w[3, :, 32:64].T)]).astype(np.float32)
    y = ig.int4_grouped_matmul(x, q, scales, gs, config=ig.Config(block_m=16, block_n=16, block_k=32),
                               interpret=True)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), want)


@pytest.mark.parametrize("block_m", [8, 16])
def test_tile_schedule(block_m):
    groups = np.array([3, 0, 17, 0, 5, 0], np.int32)
    m = 29
    meta = np.asarray(ig.tile_schedule(jnp.asarray(groups), m, block_m))
    assert meta.shape == (3, ig.max_row_tiles(m, len(groups), block_m))
    covered = np.zeros(m, int)
    ends = np.cumsum(groups)
    for expert, start, end in meta.T:
        if expert == -2:
            continue
        assert 0 < end - start <= block_m
        covered[start:end] += 1
        if expert >= 0:
            assert ends[expert] - groups[expert] <= start and end <= ends[expert]
        else:
            assert start >= ends[-1]
    np.testing.assert_array_equal(covered, 1)  # every row in exactly one tile
    # Empty experts get no tile: their weights are never read.
    assert set(meta[0][meta[0] >= 0]) == {0, 2, 4}


@pytest.mark.parametrize("block_m", [4, 16])
def test_max_row_tiles_bound_holds(block_m):
    """Random group sizes (many empty, sums up to M): tiles needed == tiles used <= the bound."""
    rng = np.random.default_rng(block_m)
    e, m = 7, 60
    schedule = jax.jit(ig.tile_schedule, static_argnums=(1, 2))
    for _ in range(40):
        groups = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet(np.full(e, 0.3)))
        meta = np.asarray(schedule(jnp.asarray(groups, jnp.int32), m, block_m))
        used = np.sum(meta[0] != -2)
        need = np.sum(-(-groups // block_m)) + -(-(m - groups.sum()) // block_m)
        assert used == need <= ig.max_row_tiles(m, e, block_m)


def test_default_config_fits_shapes():
    cfg = ig.default_config(16, 384, 2048, 7168)
    assert cfg.block_m == 16 and 2048 % cfg.block_n == 0 and 7168 % cfg.block_k == 0
    assert cfg.planes and ig.default_config(32768, 384, 7168, 2048).block_m == 128
    assert ig.default_config(8, 384, 2048, 7168) == ig.rows_config(2048, 7168)  # one token: one-row tiles
    assert ig.fit_config(ig.Config(block_n=64, block_k=256), 48, 96) == ig.Config(block_n=16, block_k=32)
    assert not ig.fit_config(ig.Config(block_k=256, planes=True), 48, 96).planes  # 32-input blocks: no planes
    gemv = ig.fit_config(ig.Config(block_n=64, block_k=256, gemv=True, planes=True), 2048, 7168)
    assert gemv.block_m == 1 and not gemv.planes  # one row per tile, no dots


def test_rejects_mismatched_shapes():
    x, q, scales = _inputs(5, 4, jnp.float32)
    gs = jnp.asarray([4, 0, 0, 0, 0, 0], jnp.int32)
    with pytest.raises(ValueError, match="scales"):
        ig.int4_grouped_matmul(x, q, scales[..., :-1], gs, interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        ig.int4_grouped_matmul(x, q, scales, gs[:-1], interpret=True)
    with pytest.raises(ValueError, match="uint32 words"):
        ig.int4_grouped_matmul(x, q.astype(jnp.int32), scales, gs, interpret=True)
    with pytest.raises(ValueError, match="8 inputs per word"):
        ig.int4_grouped_matmul(x[:, :64], q, scales, gs, interpret=True)


@pytest.mark.parametrize("cfg", [SMALL, PLANES, GEMV])
def test_a_layer_of_a_stack_is_read_in_place(cfg):
    """With ``layer``, the kernel reads that layer of stacked experts [L, E, ...]: the same as
    the layer's own experts, and the other layers (NaN scales here) are never read."""
    groups = [3, 0, 17, 0, 5, 6]
    x, q, scales = _inputs(7, 31, jnp.float32)
    gs = jnp.asarray(groups, jnp.int32)
    want = ig.int4_grouped_matmul(x, q, scales, gs, config=cfg, interpret=True)
    poison = jnp.full_like(scales, jnp.nan)
    stack_q, stack_s = jnp.stack([q, q, q]), jnp.stack([poison, poison, scales])
    y = ig.int4_grouped_matmul(x, stack_q, stack_s, gs, config=cfg, interpret=True, layer=jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


# Split-K: (config, in, expected splits after fit_config). Each k range is [s * per, min((s + 1) * per, n_k)),
# per = ceil(n_k / splits): even ranges, uneven ones, an empty last one, and more splits than k-blocks (clamped).
SPLITS = [
    (ig.Config(block_m=16, block_n=16, block_k=64, splits=2), 256, 2),  # n_k 4: 2 + 2
    (ig.Config(block_m=16, block_n=16, block_k=64, splits=3), 256, 3),  # n_k 4: 2 + 2 + 0 (empty)
    (ig.Config(block_m=16, block_n=16, block_k=64, splits=9), 128, 2),  # n_k 2: clamped to 2
    (ig.Config(block_m=16, block_n=16, block_k=128, planes=True, splits=2), 384, 2),  # n_k 3: 2 + 1
    (ig.Config(block_m=16, block_n=16, block_k=128, planes=True, splits=3), 512, 3),  # n_k 4: 2 + 2 + 0 (empty)
    (ig.Config(block_m=16, block_n=16, block_k=128, planes=True, splits=5), 256, 2),  # n_k 2: clamped to 2
    (ig.Config(block_n=16, block_k=64, gemv=True, splits=3), 256, 3),  # n_k 4: 2 + 2 + 0 (empty)
    (ig.Config(block_n=16, block_k=64, gemv=True, splits=2), 384, 2),  # n_k 6: 3 + 3
]


@pytest.mark.parametrize(("cfg", "k", "splits"), SPLITS)
def test_split_k_matches_reference(cfg, k, splits):
    """Partial sums over k ranges, then their sum: the reference up to float32 order, with empty
    experts (never read) and the rows past the sum zeros."""
    groups = [3, 0, 17, 0, 5, 0] if cfg.planes or cfg.gemv else [0, 4, 0, 0, 19, 6]
    m = 37
    x, q, scales = _inputs(k + cfg.splits, m, jnp.float32, k)
    gs = jnp.asarray(groups, jnp.int32)
    assert ig.fit_config(cfg, N, k).splits == splits
    ref = int4_ragged_dot(x, q, scales, gs)
    y = ig.int4_grouped_matmul(x, q, scales, gs, config=cfg, interpret=True)
    assert y.shape == (m, N) and y.dtype == jnp.float32
    assert _rel(y, ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(y)[sum(groups):], 0.0)  # rows past the sum


def test_split_k_bfloat16_and_a_layer_of_a_stack():
    """bf16 x (float32 partials, one cast after their sum) and ``layer=``'s stacked experts."""
    groups = [7, 0, 20, 0, 2, 12]
    k = 384
    x, q, scales = _inputs(11, 50, jnp.bfloat16, k)
    gs = jnp.asarray(groups, jnp.int32)
    cfg = ig.Config(block_m=16, block_n=16, block_k=128, planes=True, splits=2)
    poison = jnp.full_like(scales, jnp.nan)
    stack_q, stack_s = jnp.stack([q, q]), jnp.stack([poison, scales])
    y = ig.int4_grouped_matmul(x, stack_q, stack_s, gs, config=cfg, interpret=True, layer=jnp.int32(1))
    assert y.dtype == jnp.bfloat16
    assert _rel(y, int4_ragged_dot(x, q, scales, gs)) < 1e-2
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32))[sum(groups):], 0.0)


def test_split_k_config():
    assert ig.fit_config(ig.Config(block_k=64, splits=0), 48, 256).splits == 1
    assert ig.fit_config(ig.Config(block_k=256, splits=4), 48, 96).splits == 3  # block_k 32: 3 k-blocks
    assert ig.Config().splits == 1 and ig.default_config(64, 384, 2048, 7168).splits == 1
    assert ig.default_config(8, 384, 2048, 7168).splits == 2 and ig.default_config(8, 384, 7168, 2048).splits == 1
    cfg = ig.decode_split_config(8, 384, 2048, 7168, 4)
    assert cfg == dataclasses.replace(ig.default_config(8, 384, 2048, 7168), splits=4)
    assert ig.decode_split_config(8, 384, 2048, 7168, 1000).splits == 7168 // cfg.block_k


def _lowered_for_cuda(fn, *args) -> str:
    """``fn`` lowered for CUDA on this host: Pallas' Triton lowering runs (for an H100), the
    PTX compilation does not (that needs a GPU)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("cfg", [
    ig.default_config(8, 384, 2048, 7168), ig.default_config(16, 384, 2048, 7168), ig.default_config(512, 384, 2048, 7168),
    ig.default_config(32768, 384, 2048, 7168), ig.Config(block_n=128, block_k=256, gemv=True, splits=2),
    ig.Config(block_n=128, block_k=256, gemv=True, splits=2, x_planes=True),
    ig.Config(block_n=64, block_k=256, num_warps=8, planes=True),
    ig.Config(block_m=64, block_n=128, block_k=128, swap=False),
], ids=lambda c: f"bm{c.block_m}-bn{c.block_n}-planes{c.planes}-gemv{c.gemv}-splits{c.splits}-xp{c.x_planes}")
def test_configs_lower_for_cuda(cfg):
    """Every kind of config the sweep tries passes through the Triton lowering at K2.5's gate
    sizes (a config the lowering refuses would fail only on the GPU otherwise)."""
    S = jax.ShapeDtypeStruct
    x = S((8, 7168), jnp.bfloat16)
    q, s, g = S((384, 2048, 896), jnp.uint32), S((384, 2048, 224), jnp.bfloat16), S((384,), jnp.int32)
    text = _lowered_for_cuda(lambda x, q, s, g: ig.int4_grouped_matmul(x, q, s, g, config=cfg), x, q, s, g)
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("cfg", [PLANES, GEMV, dataclasses.replace(GEMV, splits=2), SMALL])
def test_several_weights_in_one_launch(cfg):
    """A SwiGLU's gate and up in one launch: each output is its own weight's product (the
    rows past the sum zeros), also for a layer of stacked experts read in place."""
    groups = [3, 0, 17, 0, 5, 0]
    m = 29
    x, q1, s1 = _inputs(40, m, jnp.float32)
    _, q2, s2 = _inputs(41, m, jnp.float32)
    gs = jnp.asarray(groups, jnp.int32)
    outs = ig.int4_grouped_matmuls(x, (q1, q2), (s1, s2), gs, config=cfg, interpret=True)
    for y, q, s in zip(outs, (q1, q2), (s1, s2), strict=True):
        assert y.shape == (m, N) and y.dtype == jnp.float32
        assert _rel(y, int4_ragged_dot(x, q, s, gs)) < 1e-5
        np.testing.assert_array_equal(np.asarray(y)[sum(groups):], 0.0)
    stacked = ig.int4_grouped_matmuls(x, (jnp.stack([q2, q1]), jnp.stack([q1, q2])),
                                      (jnp.stack([s2, s1]), jnp.stack([s1, s2])), gs, config=cfg, interpret=True,
                                      layer=jnp.int32(1))
    for y, want in zip(stacked, outs, strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    with pytest.raises(ValueError, match="differ in shape"):
        ig.int4_grouped_matmuls(x, (q1, q2[:, :16]), (s1, s2[:, :16]), gs, interpret=True)


def test_gate_and_up_lower_for_cuda():
    S = jax.ShapeDtypeStruct
    x, g = S((8, 7168), jnp.bfloat16), S((384,), jnp.int32)
    q, s = S((4, 384, 2048, 896), jnp.uint32), S((4, 384, 2048, 224), jnp.bfloat16)
    text = _lowered_for_cuda(lambda x, q1, q2, s1, s2, g: ig.int4_grouped_matmuls(x, (q1, q2), (s1, s2), g,
                                                                                layer=jnp.int32(2)),
                             x, q, q, s, s, g)
    assert "__gpu$xla.gpu.triton" in text and "int4_grouped_matmul" in text


def _rows_reference(x, q, scales, ids, fanout):
    """Each row through its own expert alone (a one-row group), zeros for ids outside [0, E)."""
    rows = []
    for r, e in enumerate(np.asarray(ids)):
        if 0 <= e < E:
            rows.append(np.asarray(int4_ragged_dot(x[r // fanout][None], q, scales,
                                                   jnp.asarray(np.eye(E, dtype=np.int32)[e])))[0])
        else:
            rows.append(np.zeros(N, np.float32))
    return np.stack(rows)


# Ids per row: two tokens' top-3 (fanout 3) with an expert shared between them, an idle
# row (id E, as the MoE marks invalid tokens) and a negative id.
ROW_IDS = [4, 0, 2, 2, E, -1]


@pytest.mark.parametrize("cfg", [GEMV, dataclasses.replace(GEMV, splits=3), dataclasses.replace(GEMV, block_k=32),
                                 dataclasses.replace(GEMV, x_planes=True, splits=3)])
def test_rows_match_reference(cfg):
    """Per-row mode: row r is x[r // fanout] times expert ids[r] alone; an id outside [0, E)
    gives a zero row; two weights in one launch and a layer of a stack read in place."""
    x, q1, s1 = _inputs(50, 2, jnp.float32, k=256)
    _, q2, s2 = _inputs(51, 2, jnp.float32, k=256)
    ids = jnp.asarray(ROW_IDS, jnp.int32)
    outs = ig.int4_rows_matmuls(x, (q1, q2), (s1, s2), ids, fanout=3, config=cfg, interpret=True)
    for y, q, s in zip(outs, (q1, q2), (s1, s2), strict=True):
        ref = _rows_reference(x, q, s, ids, 3)
        assert y.shape == (6, N) and y.dtype == jnp.float32
        assert _rel(y, ref) < 1e-5
        np.testing.assert_array_equal(np.asarray(y)[4:], 0.0)
    poison = jnp.full_like(s1, jnp.nan)
    (y,) = ig.int4_rows_matmuls(x, (jnp.stack([q2, q1]),), (jnp.stack([poison, s1]),), ids, fanout=3, config=cfg,
                                interpret=True, layer=jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(outs[0]))


def test_rows_bfloat16_default_config_and_bad_input():
    x, q, s = _inputs(52, 8, jnp.bfloat16)
    ids = jnp.asarray([5, 1, 0, 3, 2, 4, 1, 0], jnp.int32)
    (y,) = ig.int4_rows_matmuls(x, (q,), (s,), ids, interpret=True)
    assert y.dtype == jnp.bfloat16 and _rel(y, _rows_reference(x.astype(jnp.float32), q, s, ids, 1)) < 1e-2
    assert ig.rows_config(2048, 7168).gemv and ig.rows_config(2048, 7168).splits == 2
    assert not ig.rows_config(2048, 7168).x_planes and ig.rows_config(2048, 7168).block_k == 256
    assert ig.rows_config(7168, 2048).splits == 1
    with pytest.raises(ValueError, match="one-row config"):
        ig.int4_rows_matmuls(x, (q,), (s,), ids, config=SMALL, interpret=True)
    with pytest.raises(ValueError, match="x rows \\* fanout"):
        ig.int4_rows_matmuls(x, (q,), (s,), ids, fanout=2, interpret=True)
    with pytest.raises(ValueError, match="integer ids"):
        ig.int4_rows_matmuls(x, (q,), (s,), ids.astype(jnp.float32), interpret=True)


def test_rows_lower_for_cuda():
    """K2.5's one-token gate + up (split-K) and down through the Triton lowering."""
    S = jax.ShapeDtypeStruct
    x, h, ids = S((1, 7168), jnp.bfloat16), S((8, 2048), jnp.bfloat16), S((8,), jnp.int32)
    q, s = S((4, 384, 2048, 896), jnp.uint32), S((4, 384, 2048, 224), jnp.bfloat16)
    qd, sd = S((4, 384, 7168, 256), jnp.uint32), S((4, 384, 7168, 64), jnp.bfloat16)

    def step(x, h, q, s, qd, sd, ids):
        layer = jnp.int32(2)
        return (ig.int4_rows_matmuls(x, (q, q), (s, s), ids, fanout=8, layer=layer),
                ig.int4_rows_matmuls(h, (qd,), (sd,), ids, layer=layer))

    text = _lowered_for_cuda(step, x, h, q, s, qd, sd, ids)
    assert "__gpu$xla.gpu.triton" in text and "int4_rows_matmul_splitk" in text and "int4_rows_matmul\"" in text
