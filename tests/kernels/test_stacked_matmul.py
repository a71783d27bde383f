"""The stacked-weights split-K matmul kernel in Pallas' interpreter against its reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kimi_jax.kernels import stacked_matmul as sm

# A stack of L layers of [K, N] weights; blocks of 16 inputs give 8 K blocks, of 32 columns 2 column blocks.
L, K, N = 3, 128, 64
BLOCKS = {"block_k": 16, "block_n": 32}
# The interpreted kernel is a large XLA:CPU program; unoptimized code compiles in half the time.
FAST = {"xla_backend_optimization_level": 0}


@functools.cache
def _kernel(**kw):
    return jax.jit(functools.partial(sm.stacked_matmul, interpret=True, **kw), compiler_options=FAST)


def _inputs(seed, M, dtype=jnp.float32, n=N):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((M, K)), dtype),
            jnp.asarray(rng.standard_normal((L, K, n)) / np.sqrt(K), dtype))


def _rel(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


# 8 K blocks shared among 1 split, 3 (3 + 3 + 2 blocks) and 16 (8 programs with no blocks write zeros);
# M = 1 and 5 are padded to 16 rows in the kernel.
@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_float32_matches_reference(M, splits):
    x, w = _inputs(M * 100 + splits, M)
    kernel = _kernel(splits=splits, **BLOCKS)
    for layer in (0, 2):
        out = kernel(x, w, jnp.int32(layer))
        assert out.shape == (M, N) and out.dtype == jnp.float32
        assert _rel(out, sm.stacked_matmul_reference(x, w, layer)) < 1e-5


def test_bfloat16_matches_reference():
    x, w = _inputs(7, 5, jnp.bfloat16)
    ref = sm.stacked_matmul_reference(x, w, 1)
    exact = jnp.dot(x.astype(jnp.float32), w[1].astype(jnp.float32), precision=lax.Precision.HIGHEST)
    for kw in ({}, {"splits": 3, "block_k": 32}):  # defaults: one [128, 64] block; 3 splits of 4 K blocks
        out = _kernel(**kw)(x, w, jnp.int32(1))
        assert out.shape == (5, N) and out.dtype == jnp.bfloat16
        assert _rel(out, ref) < 1e-2 and _rel(out, exact) < 1e-2  # bf16 rounding of the output: ~2e-3
    # float32 out: bf16 products are exact in float32, so only the order of the sums differs
    out = _kernel(out_dtype=jnp.float32)(x, w, jnp.int32(1))
    assert out.dtype == jnp.float32 and _rel(out, exact) < 1e-6
    assert sm.stacked_matmul_reference(x, w, 1, jnp.float32).dtype == jnp.float32


def test_reads_only_the_layer():
    """The other layers of the stack are NaN: never read. ``layer`` past the stack is clamped."""
    x, w = _inputs(11, 5)
    kernel = _kernel(splits=16, **BLOCKS)
    for layer, used in ((1, 1), (7, 2), (-1, 0)):
        poisoned = jnp.where((jnp.arange(L) != used)[:, None, None], jnp.nan, w)
        out = np.asarray(kernel(x, poisoned, jnp.int32(layer)))
        assert np.isfinite(out).all()
        assert _rel(out, sm.stacked_matmul_reference(x, w, used)) < 1e-5


def test_in_a_scan_over_layers():
    """The use: a ``lax.scan`` over the stack with the layer index in the carry."""
    rng = np.random.default_rng(13)
    h0 = jnp.asarray(rng.standard_normal((3, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((L, K, K)) / np.sqrt(K), jnp.float32)

    def run(matmul):
        def step(carry, _):
            h, i = carry
            return (jnp.tanh(matmul(h, w, i)), i + 1), None

        return lax.scan(step, (h0, jnp.int32(0)), length=L)[0][0]

    kernel = functools.partial(sm.stacked_matmul, interpret=True, splits=3, **BLOCKS)
    out = jax.jit(lambda: run(kernel), compiler_options=FAST)()
    assert _rel(out, run(sm.stacked_matmul_reference)) < 1e-5


def test_rejects_bad_shapes():
    x, w = _inputs(0, 5)
    cases = [
        ((x[0], w), {}, "x .* must be 2-D"),
        ((x, w[0]), {}, "w .* must be a 3-D stack"),
        ((x[:, :64], w), {}, "K mismatch"),
        ((x, w.astype(jnp.bfloat16)), {}, "both bfloat16 or both float32"),
        ((jnp.zeros((65, K)), w), {}, "M = 65"),
        ((x, w), {"block_k": 24}, "block_k = 24 must be a power of two >= 16"),
        ((x, w), {"block_n": 128}, "block_n = 128 .* dividing N = 64"),
        ((x[:, :40], w[:, :40]), {}, "K = 40 is not divisible by 16"),
        ((x, w[:, :, :24]), {}, "N = 24 is not divisible by 16"),
        ((x, w), {"splits": 0}, "splits = 0"),
        ((x, w), {"splits": 2**23}, "the partials .* 2\\^31"),
        ((jax.ShapeDtypeStruct((1, 2**31), jnp.bfloat16), jax.ShapeDtypeStruct((2, 2**31, 16), jnp.bfloat16)), {},
         "x has 2147483648 elements"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            sm.stacked_matmul(*args, 0, interpret=True, **kw)


def test_fits_and_auto_splits():
    assert sm.fits(1, 7168, 2048) and sm.fits(64, 16, 16) and sm.fits(5, 96, 48)
    assert not sm.fits(65, 7168, 2048) and not sm.fits(0, 7168, 2048)
    assert not sm.fits(1, 40, 64) and not sm.fits(1, 64, 24)
    assert sm.auto_splits(28, 16) == 14  # K = 7168, N = 2048: 16 splits wanted, 2 blocks each leave 14
    assert sm.auto_splits(28, 56) == 5  # N = 7168: 56 column blocks, 5 splits (about 2 x 132 programs)
    assert sm.auto_splits(32, 1) == 32  # capped at the K blocks
    assert sm.auto_splits(4, 600) == 1


def test_several_stacks_in_one_launch():
    """Stacks of different widths side by side: each output is its own stack's product, in its
    own dtype; the other layers are NaN (never read)."""
    rng = np.random.default_rng(17)
    x = jnp.asarray(rng.standard_normal((3, K)), jnp.bfloat16)
    ws = [jnp.asarray(rng.standard_normal((L, K, n)) / np.sqrt(K), jnp.bfloat16) for n in (48, 64, 16)]
    poisoned = [jnp.where((jnp.arange(L) != 2)[:, None, None], jnp.nan, w) for w in ws]
    run = jax.jit(functools.partial(sm.stacked_matmuls, interpret=True, splits=3, block_k=32,
                                    out_dtypes=(jnp.float32, None, jnp.float32)), compiler_options=FAST)
    outs = run(x, poisoned, jnp.int32(2))
    assert [o.dtype for o in outs] == [jnp.float32, jnp.bfloat16, jnp.float32]
    for out, w in zip(outs, ws, strict=True):
        exact = jnp.dot(x.astype(jnp.float32), w[2].astype(jnp.float32), precision=lax.Precision.HIGHEST)
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert _rel(out, exact) < (1e-6 if out.dtype == jnp.float32 else 1e-2)
    with pytest.raises(ValueError, match="block_n = 32 .* dividing N = 48"):
        sm.stacked_matmuls(x, ws, 0, block_n=32, interpret=True)
    with pytest.raises(ValueError, match="stacks of 2 and 3 layers"):
        sm.stacked_matmuls(x, [ws[0], ws[1][:2]], 0, interpret=True)
