"""Tiny models and batches for the training tests: the fixtures ``model``, ``batch``,
``make_model`` and ``make_batch``."""

import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax.testing.models import random_model
from kimi_jax.testing.synthetic import k25_config

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2)


def tiny_model(expert_format="dense", parallel=None, **text):
    config = kimi_jax.KimiConfig.from_dict(k25_config(dict(TEXT, **text), multimodal=False))
    return random_model(config, dtype=jnp.float32, expert_format=expert_format, parallel=parallel, seed=1)


def tiny_batch(seed=0, B=4, T=12):
    ids = np.random.default_rng(seed).integers(0, TEXT["vocab_size"], (B, T + 1))
    weights = np.ones((B, T), np.float32)
    weights[:, : T // 3] = 0  # a prompt
    valid = np.ones((B, T), bool)
    valid[-1, -2:] = False  # padding
    weights[~valid] = 0
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": weights, "valid": valid}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def batch():
    return tiny_batch()


@pytest.fixture(scope="session")
def make_model():
    return tiny_model


@pytest.fixture(scope="session")
def make_batch():
    return tiny_batch

