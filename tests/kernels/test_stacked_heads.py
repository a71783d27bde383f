"""The per-head stacked matmul kernel (MLA's kv_b_proj halves) in Pallas' interpreter against its reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.kernels import stacked_heads as sh

# A stack of L layers of [C, G, W] weights (pairwise-distinct sizes); parts: (start, width) of a head's row.
L, C, G, W = 3, 64, 4, 48
KEY, VALUE = (0, 32), (32, 16)
# The interpreted kernel is a large XLA:CPU program; unoptimized code compiles in half the time.
FAST = {"xla_backend_optimization_level": 0}


@functools.cache
def _kernel(**kw):
    return jax.jit(functools.partial(sh.stacked_heads_matmul, interpret=True, **kw), compiler_options=FAST)


def _inputs(seed, M, fold, part, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, G, part[1] if fold else C))
    return jnp.asarray(x, dtype), jnp.asarray(rng.standard_normal((L, C, G, W)) / np.sqrt(C), dtype)


def _rel(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _einsum(x, w, layer, part, fold):
    """What MLA computes, written out: the heads as a batch axis of the sliced layer."""
    start, width = part
    spec = "mgh,cgh->mgc" if fold else "mgc,cgv->mgv"
    return np.einsum(spec, np.asarray(x, np.float64), np.asarray(w[layer, ..., start:start + width], np.float64))


# fold: 2 output blocks of 32 latents, 2 blocks of 16 contracted columns; unfold: 4 blocks of 16 latents.
@pytest.mark.parametrize(("fold", "part"), [(True, KEY), (False, VALUE), (False, (0, 48))])
@pytest.mark.parametrize("M", [1, 5, 17])
def test_float32_matches_the_einsum(M, fold, part):
    x, w = _inputs(M, M, fold, part)
    kernel = _kernel(start=part[0], width=part[1], fold=fold, block_o=32 if fold else 16, block_k=16)
    for layer in (0, 2):
        out = kernel(x, w, jnp.int32(layer))
        assert out.shape == (M, G, C if fold else part[1]) and out.dtype == jnp.float32
        assert _rel(out, _einsum(x, w, layer, part, fold)) < 1e-6
        assert _rel(out, sh.stacked_heads_reference(x, w, layer, start=part[0], width=part[1], fold=fold)) < 1e-6


def test_bfloat16_defaults():
    for fold, part in ((True, KEY), (False, VALUE)):
        x, w = _inputs(7, 3, fold, part, jnp.bfloat16)
        out = _kernel(start=part[0], width=part[1], fold=fold)(x, w, jnp.int32(1))
        assert out.dtype == jnp.bfloat16
        assert _rel(out, _einsum(x, w, 1, part, fold)) < 1e-2  # bf16 rounding of the output: ~2e-3


def test_reads_only_the_layer_and_the_part():
    """Other layers, and a head's columns outside the part, are NaN: never read. ``layer`` past the stack is clamped."""
    for fold, part in ((True, KEY), (False, VALUE)):
        x, w = _inputs(11, 5, fold, part)
        kernel = _kernel(start=part[0], width=part[1], fold=fold, block_k=16)
        cols = jnp.arange(W)
        outside = (cols < part[0]) | (cols >= part[0] + part[1])
        for layer, used in ((1, 1), (7, 2), (-1, 0)):
            poisoned = jnp.where((jnp.arange(L) != used)[:, None, None, None] | outside, jnp.nan, w)
            out = np.asarray(kernel(x, poisoned, jnp.int32(layer)))
            assert np.isfinite(out).all()
            assert _rel(out, _einsum(x, w, used, part, fold)) < 1e-6


def test_rejects_bad_shapes():
    x, w = _inputs(0, 5, True, KEY)
    cases = [
        ((x, w[0]), {}, "w .* must be a 4-D stack"),
        ((x[0], w), {}, "x .* must be 3-D"),
        ((x, w), {"start": 32, "width": 32}, r"columns \[32, 64\) are not inside a head's 48"),
        ((x[:, :, :16], w), {}, "does not match w"),
        ((x, w.astype(jnp.bfloat16)), {}, "both bfloat16 or both float32"),
        ((jnp.zeros((65, G, 32)), w), {}, "M = 65"),
        ((x[:, :, :24], w), {"width": 24}, "width = 24 is not a multiple of 16"),
        ((x, w), {"block_o": 24}, "block_o = 24 must be a power of two >= 16 dividing 64"),
        ((x, w), {"block_k": 64}, "block_k = 64 must be a power of two >= 16 dividing 32"),
    ]
    for args, kw, match in cases:
        kw = {"start": 0, "width": 32, "fold": True} | kw
        with pytest.raises(ValueError, match=match):
            sh.stacked_heads_matmul(*args, 0, interpret=True, **kw)


def test_fits():
    assert sh.fits(1, 512, 256, 0, 128) and sh.fits(64, 512, 256, 128, 128)  # K2.5's halves at decode
    assert not sh.fits(65, 512, 256, 0, 128) and not sh.fits(0, 512, 256, 0, 128)
    assert not sh.fits(1, 40, 256, 0, 128) and not sh.fits(1, 512, 256, 8, 128) and not sh.fits(1, 512, 256, 192, 128)
