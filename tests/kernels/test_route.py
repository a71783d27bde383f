"""The router kernel in Pallas' interpreter against ``select_experts`` (the reference)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax.kernels.route import route_top_k
from kimi_jax.model.moe import select_experts

K25 = kimi_jax.kimi_k25_config().text


def _reference(scores, bias, k, normalize):
    cfg = dataclasses.replace(K25, num_experts_per_tok=k, norm_topk_prob=normalize)
    return select_experts(scores, bias, cfg)


def _check(scores, bias, k, normalize=True):
    want_w, want_i = _reference(scores, bias, k, normalize)
    got_w, got_i = route_top_k(scores, bias, k, normalize=normalize, factor=K25.routed_scaling_factor,
                               interpret=True)
    assert got_i.dtype == jnp.int32 and got_w.dtype == jnp.float32 and got_w.shape == want_w.shape
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-6)


@pytest.mark.parametrize("T, E, k, normalize", [(1, 384, 8, True), (5, 384, 8, False), (3, 12, 3, True),
                                                (2, 16, 16, True)])
def test_matches_the_reference(T, E, k, normalize):
    rng = np.random.default_rng(E + T)
    scores = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((T, E)), jnp.float32))
    bias = jnp.asarray(rng.standard_normal(E) * 0.1, jnp.float32)
    _check(scores, bias, k, normalize)


def test_ties_and_special_values_in_top_k_order():
    """Ties go to the lower index; NaN ranks above inf, -0 below +0; repeated values are each taken once."""
    scores = jnp.asarray([[0.5, 0.5, 0.1, 0.5, 0.9, 0.0, 0.0, 0.2, 0.2, 0.2],
                          [0.1, jnp.nan, 0.3, jnp.inf, -0.0, 0.0, 0.3, -jnp.inf, 0.1, -0.0]], jnp.float32)
    bias = jnp.full(10, -0.0, jnp.float32)  # keeps each zero's sign (-0 + 0 would be +0)
    _check(scores, bias, 7, normalize=False)
    _, idx = route_top_k(scores, bias, 7, normalize=False, factor=1.0, interpret=True)
    assert idx[0].tolist() == [4, 0, 1, 3, 7, 8, 9] and idx[1].tolist() == [1, 3, 2, 6, 0, 8, 5]


def test_bias_chooses_but_does_not_weigh():
    scores = jnp.asarray([[0.9, 0.2, 0.3, 0.1]], jnp.float32)
    bias = jnp.asarray([0.0, 1.0, 0.0, 0.0], jnp.float32)
    w, idx = route_top_k(scores, bias, 2, normalize=False, factor=2.0, interpret=True)
    assert idx.tolist() == [[1, 0]]
    np.testing.assert_allclose(np.asarray(w), [[0.4, 1.8]], rtol=1e-6)


def test_rejects_bad_inputs():
    scores, bias = jnp.zeros((2, 8), jnp.float32), jnp.zeros(8, jnp.float32)
    with pytest.raises(ValueError, match="bias"):
        route_top_k(scores, bias[:4], 2, normalize=True, factor=1.0)
    with pytest.raises(ValueError, match="k = 9"):
        route_top_k(scores, bias, 9, normalize=True, factor=1.0)
    with pytest.raises(ValueError, match="float32"):
        route_top_k(scores.astype(jnp.bfloat16), bias, 2, normalize=True, factor=1.0)
