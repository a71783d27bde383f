"""The ``kimi-jax`` command line: one module per command."""

from kimi_jax.cli.main import main

__all__ = ["main"]
