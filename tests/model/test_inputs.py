"""Token ids given to the model and the engine: out-of-range, empty, wrongly ranked and non-integer input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kimi_jax
from kimi_jax.config.model import KimiConfig
from kimi_jax.inference.steps import BatchEngine
from kimi_jax.model.inputs import check_prompts, check_token_ids
from kimi_jax.model.kimi import Kimi
from kimi_jax.testing.synthetic import k25_config

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
V = TEXT["vocab_size"]


@pytest.fixture(scope="module")
def model():
    config = KimiConfig.from_dict(k25_config(TEXT, multimodal=False))
    return Kimi(config, dtype=jnp.float32, rngs=nnx.Rngs(0))


def entry_points(model):
    return {"call": model, "embed_inputs": model.embed_inputs, "trace": model.trace}


@pytest.mark.parametrize("entry", ["call", "embed_inputs", "trace"])
@pytest.mark.parametrize(
    "ids, error, words",
    [
        ([[1, 2, V]], ValueError, rf"input_ids has token id {V} at batch row 0, position 2, outside the vocabulary "
                                  rf"\[0, {V}\)"),
        ([[1, 2, 3], [4, -1, 70]], ValueError, r"token id -1 at batch row 1, position 1.*\(and 1 more such ids\)"),
        (np.array([[5, 2**40]]), ValueError, r"token id 1099511627776 at batch row 0, position 1"),
        (np.zeros((1, 0), np.int32), ValueError, r"input_ids is empty \(shape \(1, 0\)\)"),
        (np.zeros((0, 4), np.int32), ValueError, r"input_ids is empty"),
        (np.arange(5), ValueError, r"input_ids must be \[batch, seq\]; got shape \(5,\)"),
        (np.zeros((1, 2, 3), np.int32), ValueError, r"must be \[batch, seq\]; got shape \(1, 2, 3\)"),
        (np.array([[1.0, 2.0]]), TypeError, "integer token ids; got dtype float64"),
        (jnp.array([[1.0, 2.0]], jnp.bfloat16), TypeError, "integer token ids; got dtype bfloat16"),
        (np.array([[True, False]]), TypeError, "integer token ids; got dtype bool"),
        ([["1", "2"]], TypeError, "integer token ids"),
        ([[1, 2], [3]], ValueError, r"input_ids must be \[batch, seq\] token ids"),
    ],
)
def test_bad_ids_raise(model, entry, ids, error, words):
    with pytest.raises(error, match=words):
        entry_points(model)[entry](ids)


def test_good_ids_of_any_integer_type(model):
    want = np.asarray(model(np.array([[0, 5, V - 1]], np.int32)))
    for ids in ([[0, 5, V - 1]], np.array([[0, 5, V - 1]], np.uint8), jnp.array([[0, 5, V - 1]], jnp.int16)):
        np.testing.assert_allclose(np.asarray(model(ids)), want, rtol=1e-6)
    assert np.isfinite(want).all()


def test_under_jit_out_of_range_ids_give_nan_logits(model):
    """Inside jit the values are not concrete: a bad id (negative ones too) makes its whole
    row's logits NaN (never a wrapped or clamped id); other rows are unchanged."""
    ids = np.array([[3, 4, -1, 5], [6, V, 7, 8], [9, 10, 11, 12]], np.int32)
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    assert np.isnan(logits[:2]).all()
    np.testing.assert_allclose(logits[2], np.asarray(model(ids[2:]))[0], rtol=1e-5, atol=1e-5)
    embeds = np.asarray(nnx.jit(lambda m, x: m.embed_inputs(x))(model, ids))
    assert np.isnan(embeds).any(-1).tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_under_jit_shapes_and_dtypes_are_still_checked(model):
    with pytest.raises(ValueError, match=r"must be \[batch, seq\]; got shape \(4,\)"):
        nnx.jit(lambda m, x: m(x))(model, np.arange(4, dtype=np.int32))
    with pytest.raises(TypeError, match="got dtype float32"):
        nnx.jit(lambda m, x: m(x))(model, np.ones((1, 4), np.float32))


def test_check_token_ids_directly():
    ids = check_token_ids(np.array([[1, 2]], np.int8), 512)
    assert ids.dtype == np.int8  # int8 cannot hold 512: only negatives are out of range
    with pytest.raises(ValueError, match="token id -3 at batch row 0, position 1"):
        check_token_ids(np.array([[1, -3]], np.int8), 512)
    with pytest.raises(ValueError, match="x has token id 9 at position 0"):
        check_token_ids([9], 8, where="x", rank=1)
    traced = jax.jit(lambda x: check_token_ids(x, 8))(jnp.array([[-1, 0, 7, 8]]))
    assert traced.dtype == jnp.int32 and traced.tolist() == [[8, 0, 7, 8]]


@pytest.mark.parametrize(
    "prompts, error, words",
    [
        ([[1, 2.5]], TypeError, "prompt 0 must hold integer token ids; got dtype float64"),
        ([[1, 2], ["3"]], TypeError, "prompt 1 must hold integer token ids"),
        ([[1], [True, False]], TypeError, "prompt 1 .* dtype bool"),
        ([1, 2, 3], ValueError, r"prompt 0 must be \[seq\]; got shape \(\)"),
        ([[1, 2], [3, V + 1]], ValueError, rf"prompt 1 has token id {V + 1} at position 1, outside the vocabulary"),
        ([[-2]], ValueError, "prompt 0 has token id -2 at position 0"),
        ([[1], []], ValueError, "prompt 1 is empty"),
        (np.ones((2, 3), np.float32), TypeError, "prompt 0 must hold integer token ids"),
        ("hello", TypeError, "prompts must be a list of token-id lists"),
    ],
)
def test_engine_prompts(model, prompts, error, words):
    engine = BatchEngine(model)
    with pytest.raises(error, match=words):
        check_prompts(prompts, V)
    if not isinstance(prompts, str):
        with pytest.raises(error, match=words):
            engine.prefill(prompts, engine.new_cache(len(prompts), 16, jnp.float32))
        with pytest.raises((TypeError, ValueError)):  # generate names the prompt's kind first
            kimi_jax.generate(model, prompts, max_new_tokens=2)


def test_engine_accepts_integer_arrays(model):
    assert check_prompts(np.array([[1, 2], [3, 4]], np.int64), V) == [[1, 2], [3, 4]]
    assert check_prompts([np.array([5], np.uint16), (6, 7)], V) == [[5], [6, 7]]
