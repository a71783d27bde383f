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
    got = cache_write(cache.c_kv, cache.k_pe, jnp.int32(1), rows, positions, c_new, k_new, interpret=True)
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
    c_new, k_new = _draw(rng, (2, 1, C)), _draw(rng, (2, 1, R))
    with pytest.raises(ValueError, match="shapes do not match"):
        cache_write(c_kv, k_pe, 0, rows, positions, c_new[:, :, :16], k_new, interpret=True)
    with pytest.raises(ValueError, match="rows"):
        cache_write(c_kv, k_pe, 0, jnp.arange(3), positions, c_new, k_new, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        cache_write(c_kv[..., :24], k_pe, 0, rows, positions, c_new[..., :24], k_new, interpret=True)
