"""The grouped (production) MoE path against the per-token reference path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.config.model import KimiConfig
from kimi_jax.model.moe import MoE, experts_grouped, experts_reference, int4_kernel
from kimi_jax.testing.synthetic import k25_config


def moe_config(**text):
    base = dict(vocab_size=64, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=12,
                num_experts_per_tok=3)
    return KimiConfig.from_dict(k25_config({**base, **text}, multimodal=False)).text


@pytest.mark.parametrize("text", [{}, {"n_group": 4, "topk_group": 2}, {"num_experts_per_tok": 1}])
def test_grouped_equals_reference(text):
    cfg = moe_config(**text)
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (3, 7, cfg.hidden_size))
    moe.set_impl("reference")
    ref = np.asarray(moe(x))
    moe.set_impl("grouped")
    grouped = np.asarray(nnx.jit(lambda m, x: m(x))(moe, x))
    np.testing.assert_allclose(grouped, ref, rtol=1e-5, atol=1e-5)


def test_grouped_handles_skewed_and_empty_groups():
    """All tokens on a few experts (most groups empty): same per-expert outputs."""
    cfg = moe_config()
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (40, cfg.hidden_size))
    idx = jnp.tile(jnp.array([[0, 5, 11]], jnp.int32), (40, 1))
    np.testing.assert_allclose(experts_grouped(moe.experts, x, idx), experts_reference(moe.experts, x, idx),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_paths_agree():
    cfg = moe_config()
    moe = MoE(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(2), (16, cfg.hidden_size), jnp.bfloat16)
    out = np.asarray(moe(x), np.float32)
    moe.set_impl("reference")
    ref = np.asarray(moe(x), np.float32)
    assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown MoE implementation"):
        MoE(moe_config(), dtype=jnp.float32, rngs=nnx.Rngs(0), impl="fast")


def test_int4_experts_are_not_trainable_params():
    """INT4 values and scales are ``Quantized`` variables: optimizers selecting nnx.Param skip them."""
    from kimi_jax.model.layers import Quantized

    cfg = KimiConfig.from_dict(k25_config(None, multimodal=False)).text
    moe = nnx.eval_shape(lambda: MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), expert_format="int4"))
    params = {path for path, _ in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
    quantized = dict(nnx.to_flat_state(nnx.state(moe, Quantized)))
    assert not any("experts" in path for path in params)
    assert set(quantized) == {("experts", p, part) for p in ("gate_proj", "up_proj", "down_proj")
                              for part in ("q", "scales")}
    assert quantized[("experts", "down_proj", "scales")].get_metadata()["axes"] == (
        "expert", "embed", "expert_mlp_groups")
    assert quantized[("experts", "gate_proj", "scales")].get_metadata()["axes"] == (
        "expert", "expert_mlp", "embed_groups")


@pytest.mark.parametrize("impl", ["grouped-xla", "grouped-pallas"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_int4_grouped_kernels_equal_reference(impl, tokens):
    """Both INT4 grouped paths (XLA dequantize + ragged_dot; the fused Pallas kernel, in
    interpret mode here) against the per-token reference: decode (few rows) and prefill."""
    cfg = moe_config(hidden_size=64, moe_intermediate_size=32)
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5), expert_format="int4")
    x = jax.random.normal(jax.random.key(3), (tokens, cfg.hidden_size))
    moe.set_impl("reference")
    ref = np.asarray(moe(x))
    moe.set_impl(impl)
    out = np.asarray(nnx.jit(lambda m, x: m(x))(moe, x))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_grouped_picks_the_kernel_on_gpus_only(monkeypatch):
    assert int4_kernel("grouped") == "xla"  # the CPU: the kernel would run in the interpreter
    assert int4_kernel("grouped-pallas") == "pallas" and int4_kernel("grouped-xla") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert int4_kernel("grouped") == "pallas"
