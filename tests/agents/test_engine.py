"""Agents on the real serving engine with a tiny random model (greedy): runs decoded together
equal the same runs one after another, in fewer engine steps, sharing their cached prefix."""

import jax.numpy as jnp
import pytest

from kimi_jax.agents import Agent, Swarm, calculator
from kimi_jax.config.model import KimiConfig
from kimi_jax.inference.engine import Engine
from kimi_jax.testing.demo import DEMO_VOCAB_SIZE
from kimi_jax.testing.models import random_model
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config

TASKS = [f"Compute {a} * {b} and explain." for a, b in ((3, 4), (12, 7), (5, 5), (9, 100), (8, 8), (41, 2))]


@pytest.fixture(scope="module")
def model():
    config = KimiConfig.from_dict(k25_config(dict(TINY_TEXT, vocab_size=DEMO_VOCAB_SIZE), multimodal=False))
    return random_model(config, dtype=jnp.float32, expert_format="dense", seed=3)


def engine(model):
    return Engine(model, max_slots=4, max_length=1024, prefill_chunk=64, cache_dtype=jnp.float32)


def test_together_equals_one_by_one(model, tok):
    options = dict(tokenizer=tok, system="You are a sub-agent.", max_steps=2, max_new_tokens=12, temperature=0.0)
    together = Agent(engine(model), [calculator], **options)
    results = together.run_many(TASKS)
    stats = together.engine.stats()
    alone = Agent(engine(model), [calculator], **options)
    solo = [alone.run(task) for task in TASKS]
    assert [r.messages for r in results] == [s.messages for s in solo]
    assert [[st.generated_tokens for st in r.steps] for r in results] == [[st.generated_tokens for st in s.steps]
                                                                         for s in solo]
    assert results[0].engine_steps < sum(s.engine_steps for s in solo)
    # the tool declarations and system prompt are prefilled once per slot, then reused
    assert stats["reused_tokens"] > (len(TASKS) - 4) * 100


def test_swarm_builds_its_engine_from_a_model(model, tok):
    swarm = Swarm(model, [calculator], tokenizer=tok, max_steps=1, max_new_tokens=4, temperature=0.0, max_slots=2,
                  max_length=2048)
    result = swarm.run("Compute 2 + 2.")
    assert swarm.engine.max_slots == 2 and swarm.engine.max_length == 2048
    assert result.orchestrator.finish_reason != "context" and len(result.orchestrator.steps) == 1
    assert result.engine_steps >= 4
