"""The agent loop with the trained calculator model: held-out questions answered through real calls."""

import re

import pytest

import kimi_jax
from kimi_jax.agents import Agent
from kimi_jax.testing.demo import CALCULATOR_MODEL
from kimi_jax.train import calculator


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    converted = tmp_path_factory.mktemp("calculator") / "model"
    kimi_jax.convert(CALCULATOR_MODEL, converted, progress=False)
    model = kimi_jax.load(converted, dtype="float32")
    return converted, kimi_jax.Engine(model, max_slots=1, max_length=1024)


@pytest.mark.parametrize("mode", ["instant", "thinking"])
def test_agent_answers_held_out_questions_with_the_tool(setup, mode):
    converted, engine = setup
    for question in calculator.held_out(40)[-3:]:  # the model never saw these
        result = Agent(engine, [calculator.tool()], tokenizer=converted, mode=mode, max_steps=3,
                       max_new_tokens=192, temperature=0.0).run(question.text)
        [call] = result.tool_calls
        assert call.name == "calculator" and call.error is None
        assert result.finish_reason == "answer" and re.search(rf"(?<![\d.]){re.escape(question.answer)}(?![\d])",
                                                                      result.answer), (question, result.answer)
