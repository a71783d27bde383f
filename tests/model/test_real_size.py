"""The real K2.5 decoder, instantiated abstractly (no memory)."""

import jax.numpy as jnp
from flax import nnx

from kimi_jax import Kimi, kimi_k25_config
from kimi_jax.checkpoint.summary import active_parameters, parameter_counts


def test_parameter_counts():
    config = kimi_k25_config()
    counts = parameter_counts(config)
    total, active = sum(counts.values()), active_parameters(config, counts)
    assert abs(total / 1.03e12 - 1) < 0.01, total
    assert abs(active / 32.9e9 - 1) < 0.01, active
    assert counts["routed_experts"] == 60 * 384 * 3 * 7168 * 2048


def test_abstract_model_shapes():
    model = nnx.eval_shape(lambda: Kimi(kimi_k25_config(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    layer = model.language_model.layer(1)
    assert layer.mlp.experts.gate_proj.shape == (384, 7168, 2048)
    assert layer.self_attn.kv_b_proj.shape == (512, 64, 256)
    assert layer.self_attn.o_proj.shape == (64, 128, 7168)
    assert model.language_model.lm_head.shape == (7168, 163840)
