"""Against Moonshot's own reference outputs on a tiny model in the official layout (text_e8)."""

import json

import numpy as np
import pytest

import kimi_jax
from kimi_jax.model.layers import yarn_correction_range, yarn_inv_freq


@pytest.fixture(scope="module")
def golden(fixtures, tmp_path_factory):
    folder = fixtures / "golden" / "text_e8"
    dst = tmp_path_factory.mktemp("golden") / "text_e8"
    kimi_jax.convert(folder, dst, dtype="float32", progress=False)
    model = kimi_jax.load(dst)
    return (model, dict(np.load(folder / "inputs.npz")), dict(np.load(folder / "expected.npz")),
            json.loads((folder / "diagnostics.json").read_text()))


def rel(a, b):
    return np.abs(np.asarray(a) - b).max() / np.abs(b).max()


def test_yarn_and_softmax_scale(golden):
    model, _, _, diag = golden
    cfg = model.config.text
    np.testing.assert_allclose(yarn_inv_freq(cfg), diag["yarn_inv_freq"], rtol=1e-6)
    assert list(yarn_correction_range(cfg)) == diag["yarn_correction_range_low_high"]
    assert cfg.softmax_scale == pytest.approx(diag["softmax_scale"], rel=1e-12)


def test_logits(golden):
    model, inputs, expected, _ = golden
    assert rel(model(inputs["input_ids"]), expected["logits"]) < 1e-5


def test_longer_sequence_logits(golden):
    model, _, expected, _ = golden
    ids = np.concatenate([golden[1]["input_ids"], expected["generate_ids"]], axis=1)
    assert rel(model(ids), expected["full_forward_logits_prompt_plus_greedy"]) < 1e-5


def test_per_layer_activations(golden):
    model, inputs, expected, _ = golden
    _, inter = model.trace(inputs["input_ids"])
    assert rel(inter["embed"], expected["embed"]) < 1e-6
    out = expected["embed"]
    for i in range(model.config.text.num_hidden_layers):
        assert rel(inter[f"layers.{i}.input_norm"], expected[f"layer{i}_input_norm"]) < 1e-5
        assert rel(inter[f"layers.{i}.attn_out"], expected[f"layer{i}_attn_out"]) < 1e-5
        assert rel(inter[f"layers.{i}.mlp_out"], expected[f"layer{i}_mlp_out"]) < 1e-5
        out = out + expected[f"layer{i}_attn_out"] + expected[f"layer{i}_mlp_out"]
        assert rel(out, expected[f"layer{i}_out"]) < 1e-5
    assert rel(inter["final_norm"], expected["final_norm"]) < 1e-5


@pytest.mark.parametrize("layer", [1, 2])
def test_router(golden, layer):
    model, inputs, expected, _ = golden
    _, inter = model.trace(inputs["input_ids"])
    idx, weights = np.asarray(inter[f"layers.{layer}.router_idx"]), np.asarray(inter[f"layers.{layer}.router_weights"])
    order = np.argsort(idx, -1)
    np.testing.assert_array_equal(np.take_along_axis(idx, order, -1), expected[f"layer{layer}_router_topk_idx_sorted"])
    np.testing.assert_allclose(np.take_along_axis(weights, order, -1),
                               expected[f"layer{layer}_router_topk_weight_sorted"], rtol=1e-5)
    np.testing.assert_allclose(inter[f"layers.{layer}.router_scores"], expected[f"layer{layer}_router_scores_sigmoid"],
                               rtol=1e-5, atol=1e-6)


def test_greedy_continuation(golden):
    """The reference's greedy ids are the argmax of our logits over prompt + continuation."""
    model, inputs, expected, _ = golden
    T, n = inputs["input_ids"].shape[1], expected["generate_ids"].shape[1]
    ids = np.concatenate([inputs["input_ids"], expected["generate_ids"]], axis=1)
    np.testing.assert_array_equal(np.asarray(model(ids))[:, T - 1 : T - 1 + n].argmax(-1), expected["generate_ids"])
