"""A tiny random K2.5 checkpoint (the demo's, float32) and an OpenAI-compatible server on loopback serving it."""

import threading
import time

import pytest
import uvicorn

import kimi_jax
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.serve import create_app
from kimi_jax.testing.demo import (
    DEMO_VOCAB_SIZE,
    write_demo_checkpoint,
    write_tokenizer,
)

SHAPE = {"max_slots": 4, "max_length": 1024, "prefill_chunk": 32, "cache_dtype": "float32"}
"""The served engine's shapes (engines of the same shapes in the tests compile nothing new)."""


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """The demo's byte-level tokenizer with K2.5's special tokens."""
    return Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tokenizer"), DEMO_VOCAB_SIZE))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    write_demo_checkpoint(work / "hf")
    return kimi_jax.convert(work / "hf", work / "converted", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def model(checkpoint):
    return kimi_jax.load(checkpoint, dtype="float32")


@pytest.fixture(scope="session")
def shape() -> dict:
    return dict(SHAPE)


@pytest.fixture(scope="session")
def served(model, checkpoint):
    """(base URL, app) of a server on a free loopback port, up for the whole session."""
    app = create_app(model, Tokenizer.from_dir(checkpoint), max_queue=32, **SHAPE)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=30)
    app.state.server.worker.stop()
