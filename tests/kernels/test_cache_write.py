"""The cache-write kernel in Pallas' interpreter against ``LayerCache.write`` (the reference)."""

import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.kernels.cache_write import cache_write
from kimi_jax.model.cache import LayerCache

B, L, S, C, R = 4, 3, 9, 32, 16


def _draw(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_matches_the_reference_write(cache_dtype):
    """Rows out of order, two tokens each; positions at both ends, past the end (S, S + 3) and
    negative (dropped, never counted from the end); values cast to the cache's dtype."""
    rng = np.random.default_rng(0)
    cache = LayerCache(_draw(rng, (B, L, S, C), cache_dtype), _draw(rng, (B, L, S, R), cache_dtype))
    rows = jnp.asarray([3, 0, 2], jnp.int32)
    positions = jnp.asarray([[0, 1], [S - 1, S], [-1, S + 3]], jnp.int32)
    c_new, k_new = _draw(rng, (3, 2, C)), _draw(rng, (3, 2, R))
    want = cache.write(jnp.int32(1), positions, c_new, k_new, rows=rows)
    got = cache_write(cache.c_kv, cache.k_pe, jnp.int32(1), rows, positions, jnp.concatenate([c_new, k_new], -1),
                      interpret=True)
    for g, w, old in zip(got, (want.c_kv, want.k_pe), (cache.c_kv, cache.k_pe), strict=True):
        assert g.dtype == cache_dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    # what changed: rows 3 (slots 0, 1) and 0 (slot S - 1) of layer 1, nothing else
    changed = np.argwhere(np.asarray(jnp.any(got[0] != cache.c_kv, axis=-1)))
    assert sorted(map(tuple, changed)) == [(0, 1, S - 1), (3, 1, 0), (3, 1, 1)]


def test_rejects_bad_shapes():
    rng = np.random.default_rng(2)
    c_kv, k_pe = _draw(rng, (B, L, S, C)), _draw(rng, (B, L, S, R))
    positions, rows = jnp.zeros((2, 1), jnp.int32), jnp.arange(2)
    new = _draw(rng, (2, 1, C + R))
    cos = jnp.zeros((2, 1, R // 2))
    cases = [
        ((c_kv, k_pe, 0, rows, positions, new[..., 8:]), {}, "shapes do not match"),
        ((c_kv, k_pe, 0, jnp.arange(3), positions, new), {}, "rows"),
        ((c_kv[..., :24], k_pe, 0, rows, positions, new[..., 8:]), {}, "powers of two"),
        ((c_kv, k_pe, 0, rows, positions, new), {"norm": (jnp.ones(R), 1e-6)}, "the norm's scale"),
        ((c_kv, k_pe, 0, rows, positions, new), {"norm": (jnp.ones(C), 0.0)}, "eps 0.0 > 0"),
        ((c_kv, k_pe, 0, rows, positions, new), {"rope": (cos, cos[..., :4])}, "cos .* and sin"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            cache_write(*args, interpret=True, **kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_normalizes_and_rotates(dtype):
    """With ``norm`` and ``rope`` the kernel stores what ``MLA._latents_from`` makes of a kv down
    projection: the latent's RMSNorm and the key's rotated pairs; the norm's scale may come as a
    stack [L, C], of which row ``layer`` is used."""
    from kimi_jax.model.layers import apply_rope, rms_norm

    rng = np.random.default_rng(3)
    cache = LayerCache(jnp.zeros((B, L, S, C), jnp.bfloat16), jnp.zeros((B, L, S, R), jnp.bfloat16))
    rows, positions = jnp.asarray([2, 1], jnp.int32), jnp.asarray([[4, 5, 6], [0, 1, S]], jnp.int32)
    new = _draw(rng, (2, 3, C + R), dtype) * 3
    scale = _draw(rng, (C,), dtype)
    angles = _draw(rng, (2, 3, R // 2))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    want = cache.write(jnp.int32(2), positions, rms_norm(new[..., :C], scale, 1e-6),
                       apply_rope(new[..., C:], cos, sin), rows=rows)
    got = cache_write(cache.c_kv, cache.k_pe, jnp.int32(2), rows, positions, new, norm=(scale, 1e-6),
                      rope=(cos, sin), interpret=True)
    stacked = jnp.stack([scale * 0 + 7, scale * 0 + 7, scale])  # [L, C]: row 2 is the layer's
    again = cache_write(cache.c_kv, cache.k_pe, jnp.int32(2), rows, positions, new, norm=(stacked, 1e-6),
                        rope=(cos, sin), interpret=True)
    for a, g in zip(again, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(g, np.float32))
    for g, w in zip(got, (want.c_kv, want.k_pe), strict=True):
        # the sum of squares (and the rotation's float32 products) may round differently: one bf16 step at most
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-2, atol=1e-6)
        written = np.asarray(w, np.float32)[[2, 2, 2, 1, 1], 2, [4, 5, 6, 0, 1]]  # [5, C or R]
        assert np.mean(np.asarray(g, np.float32)[[2, 2, 2, 1, 1], 2, [4, 5, 6, 0, 1]] == written) > 0.95
