"""The embedded default model (trained by the ``calculator`` recipe) answers held-out questions."""

import pytest

import kimi_jax
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.testing.demo import CALCULATOR_MODEL
from kimi_jax.train import calculator


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("calculator") / "model"
    kimi_jax.convert(CALCULATOR_MODEL, out, progress=False)
    return out


@pytest.mark.parametrize("thinking", [True, False])
def test_embedded_model_uses_the_calculator(converted, thinking):
    model = kimi_jax.load(converted, dtype="float32")
    questions = calculator.held_out(10)
    acc, records = calculator.accuracy(model, Tokenizer.from_dir(converted), questions, thinking=thinking)
    assert acc >= 0.9, [r for r in records if not r["correct"]][:3]
    assert all(r["expression"] for r in records)  # each answer came through a tool call


def test_embedded_model_size():
    assert sum(f.stat().st_size for f in CALCULATOR_MODEL.iterdir()) < 10 * 2**20
