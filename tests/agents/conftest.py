import pytest

from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.testing.demo import DEMO_VOCAB_SIZE, write_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level tokenizer with K2.5's special tokens and its official Jinja chat template."""
    return write_tokenizer(tmp_path_factory.mktemp("agent-tokenizer"), DEMO_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)

