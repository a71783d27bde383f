"""``kimi_jax.testing.models.random_model``: large arrays made one per initializer, same values."""

import jax
import numpy as np
from flax import nnx

from kimi_jax.config.model import KimiConfig
from kimi_jax.testing import models
from kimi_jax.testing.synthetic import k25_config

TEXT = dict(vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
            v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2)


def test_large_arrays_one_by_one_keep_the_values(monkeypatch):
    """With every array counted as large (one initializer each) the model is the same as from
    a single initializer, array for array."""
    config = KimiConfig.from_dict(k25_config(TEXT, multimodal=False))
    whole = nnx.state(models.random_model(config, seed=3)).to_pure_dict()
    monkeypatch.setattr(models, "LARGE_ARRAY_BYTES", 1)
    calls = []
    jit = jax.jit
    monkeypatch.setattr(models.jax, "jit", lambda *a, **k: calls.append(1) or jit(*a, **k))
    split = nnx.state(models.random_model(config, seed=3)).to_pure_dict()
    assert len(calls) == len(jax.tree.leaves(whole)) > 10
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), whole, split)
