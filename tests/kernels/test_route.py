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


def _check(logits, bias, k, normalize=True):
    want_w, want_i = _reference(jax.nn.sigmoid(logits), bias, k, normalize)
    got_w, got_i = route_top_k(logits, bias, k, normalize=normalize, factor=K25.routed_scaling_factor,
                               interpret=True)
    assert got_i.dtype == jnp.int32 and got_w.dtype == jnp.float32 and got_w.shape == want_w.shape
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-6)


@pytest.mark.parametrize("T, E, k, normalize", [(1, 384, 8, True), (5, 384, 8, False), (3, 12, 3, True),
                                                (2, 16, 16, True)])
def test_matches_the_reference(T, E, k, normalize):
    rng = np.random.default_rng(E + T)
    logits = jnp.asarray(rng.standard_normal((T, E)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(E) * 0.1, jnp.float32)
    _check(logits, bias, k, normalize)


def test_ties_and_special_values_in_top_k_order():
    """Ties go to the lower index; repeated values are each taken once; infinite logits are scores
    0 and 1; a NaN logit (its score's sign bit is the sigmoid's) takes top_k's place."""
    logits = jnp.asarray([[0.5, 0.5, 0.1, 0.5, 0.9, 0.0, 0.0, 0.2, 0.2, 0.2],
                          [0.1, 0.3, 0.3, jnp.inf, -jnp.inf, 0.0, 0.3, -jnp.inf, 0.1, 0.0],
                          [0.1, jnp.nan, 0.3, jnp.inf, -jnp.inf, 0.0, 0.3, -jnp.inf, 0.1, 0.0]], jnp.float32)
    bias = jnp.zeros(10, jnp.float32)
    _check(logits, bias, 7, normalize=False)
    _, idx = route_top_k(logits, bias, 7, normalize=False, factor=1.0, interpret=True)
    assert idx[0].tolist() == [4, 0, 1, 3, 7, 8, 9] and idx[1].tolist() == [3, 1, 2, 6, 0, 8, 5]


def test_bias_chooses_but_does_not_weigh():
    logits = jnp.asarray([[2.0, -1.0, 0.0, -2.0]], jnp.float32)
    bias = jnp.asarray([0.0, 1.0, 0.0, 0.0], jnp.float32)
    w, idx = route_top_k(logits, bias, 2, normalize=False, factor=2.0, interpret=True)
    assert idx.tolist() == [[1, 0]]
    np.testing.assert_allclose(np.asarray(w), 2 * jax.nn.sigmoid(logits[:, [1, 0]]), rtol=1e-6)


def test_idle_tokens_choose_no_expert():
    """Where ``valid`` is False every choice is E (past every expert); the others are unchanged."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    bias = jnp.zeros(16, jnp.float32)
    w_all, i_all = route_top_k(logits, bias, 4, normalize=True, factor=1.0, interpret=True)
    w, idx = route_top_k(logits, bias, 4, normalize=True, factor=1.0, valid=jnp.asarray([True, False, True]),
                         interpret=True)
    assert idx[1].tolist() == [16] * 4
    np.testing.assert_array_equal(np.asarray(idx)[[0, 2]], np.asarray(i_all)[[0, 2]])
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w_all))


def test_rejects_bad_inputs():
    scores, bias = jnp.zeros((2, 8), jnp.float32), jnp.zeros(8, jnp.float32)
    with pytest.raises(ValueError, match="bias"):
        route_top_k(scores, bias[:4], 2, normalize=True, factor=1.0)
    with pytest.raises(ValueError, match="k = 9"):
        route_top_k(scores, bias, 9, normalize=True, factor=1.0)
    with pytest.raises(ValueError, match="float32"):
        route_top_k(scores.astype(jnp.bfloat16), bias, 2, normalize=True, factor=1.0)
    with pytest.raises(ValueError, match="valid"):
        route_top_k(scores, bias, 2, normalize=True, factor=1.0, valid=jnp.ones(3, bool))


def test_a_layer_of_a_stack_of_biases():
    """``bias`` [L, E] with ``layer``: row ``layer`` (clamped) is used, read in place."""
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    stack = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
    for layer, row in ((0, 0), (2, 2), (7, 2)):
        got = route_top_k(logits, stack, 4, normalize=True, factor=1.0, layer=jnp.int32(layer), interpret=True)
        want = route_top_k(logits, stack[row], 4, normalize=True, factor=1.0, interpret=True)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(ValueError, match="bias"):
        route_top_k(logits, stack, 4, normalize=True, factor=1.0)  # a stack needs a layer
