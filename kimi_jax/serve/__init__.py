"""An OpenAI-compatible server over the serving engine: FastAPI app, engine thread, tool-call grammar."""

from kimi_jax.serve.app import create_app

__all__ = ["create_app"]
