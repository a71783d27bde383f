"""The fused INT4 grouped matmul in Pallas' interpreter against its pure-JAX reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.kernels import int4_grouped as ig

# Pairwise-distinct sizes: experts, out, in (in a multiple of 32 scales and of block_k).
E, N, K = 6, 48, 128
SMALL = ig.Config(block_m=16, block_n=16, block_k=64)


def _inputs(seed, m, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, K)), dtype)
    q = jnp.asarray(rng.integers(-8, 8, (E, N, K)), jnp.int4)
    scales = jnp.asarray(rng.uniform(0.005, 0.05, (E, N, K // ig.GROUP)), jnp.bfloat16)
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


@pytest.mark.parametrize(
    ("groups", "packed"), [(g, False) for g in GROUPS] + [(g, True) for g in GROUPS[:2]]
)
def test_float32_matches_reference(groups, packed):
    m = 41
    x, q, scales = _inputs(sum(groups), m, jnp.float32)
    gs = jnp.asarray(groups, jnp.int32)
    ref = ig.reference(x, q, scales, gs)
    qk = ig.to_kernel_layout(q, scales)[0] if packed else q
    y = jax.block_until_ready(ig.int4_grouped_matmul(x, qk, scales, gs, config=SMALL, interpret=True))
    assert y.shape == (m, N) and y.dtype == jnp.float32
    assert _rel(y, ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(y)[sum(groups):], 0.0)  # rows past the sum


@pytest.mark.parametrize("swap", [True, False])
def test_bfloat16_matches_reference(swap):
    groups = [7, 0, 20, 0, 2, 19]
    x, q, scales = _inputs(1, 50, jnp.bfloat16)
    gs = jnp.asarray(groups, jnp.int32)
    ref = ig.reference(x, q, scales, gs)
    cfg = ig.Config(block_m=16, block_n=16, block_k=32, swap=swap)
    y = ig.int4_grouped_matmul(x, q, scales, gs, config=cfg, interpret=True)
    assert y.dtype == jnp.bfloat16
    assert _rel(y, ref) < 1e-2  # bf16 rounding of the output, float32 accumulation order
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32))[sum(groups):], 0.0)


def test_dequantization_is_exact():
    """W is q * scale rounded once to x's dtype, as the reference, in both layouts.

    One-hot rows of x pick single input columns, so y = W.T exactly (one product each).
    """
    x = jnp.eye(K, dtype=jnp.bfloat16)[: 2 * 32]
    _, q, scales = _inputs(2, 1, jnp.bfloat16)
    gs = jnp.asarray([0, 32, 0, 32, 0, 0], jnp.int32)
    w = (q.astype(jnp.bfloat16).reshape(E, N, K // 32, 32) * scales[..., None]).reshape(E, N, K)
    want = np.concatenate([np.asarray(w[1, :, :32].T), np.asarray(w[3, :, 32:64].T)]).astype(np.float32)
    for qk in (q, ig.to_kernel_layout(q, scales)[0]):
        y = ig.int4_grouped_matmul(x, qk, scales, gs, config=ig.Config(block_m=16, block_n=16, block_k=32),
                                   interpret=True)
        np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), want)


def test_kernel_layout_round_trip_and_packing():
    _, q, scales = _inputs(3, 1, jnp.float32)
    words, same = ig.to_kernel_layout(q, scales)
    assert words.dtype == jnp.uint32 and words.shape == (E, N, K // 8) and same is scales
    np.testing.assert_array_equal(np.asarray(ig.from_kernel_layout(words)), np.asarray(q))
    # compressed-tensors pack-quantized: input 8k + j as q + 8 in bits 4j..4j+3 of word k.
    qn = np.asarray(q, np.int64)
    expect = sum(((qn[..., j::8] + 8) << (4 * j)) for j in range(8)).astype(np.uint32)
    np.testing.assert_array_equal(np.asarray(words), expect)


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
    cfg = ig.default_config(8, 384, 2048, 7168)
    assert cfg.block_m == 16 and 2048 % cfg.block_n == 0 and 7168 % cfg.block_k == 0
    assert ig.default_config(32768, 384, 7168, 2048).block_m == 128
    assert ig.fit_config(ig.Config(block_n=64, block_k=256), 48, 96) == ig.Config(block_n=16, block_k=32)


def test_rejects_mismatched_shapes():
    x, q, scales = _inputs(5, 4, jnp.float32)
    gs = jnp.asarray([4, 0, 0, 0, 0, 0], jnp.int32)
    with pytest.raises(ValueError, match="scales"):
        ig.int4_grouped_matmul(x, q, scales[..., :-1], gs, interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        ig.int4_grouped_matmul(x, q, scales, gs[:-1], interpret=True)
    with pytest.raises(ValueError, match="int4 or packed"):
        ig.int4_grouped_matmul(x, q.astype(jnp.int8), scales, gs, interpret=True)
