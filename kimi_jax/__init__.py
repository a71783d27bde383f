"""Kimi K2.5 in JAX and Flax NNX."""

from kimi_jax.checkpoint import load
from kimi_jax.config import KimiConfig, TextConfig, UnsupportedConfigError, kimi_k25_config
from kimi_jax.convert import ConversionError, convert
from kimi_jax.generation import generate
from kimi_jax.model import Kimi
from kimi_jax.vision.media import expand_media_placeholders

__all__ = [
    "ConversionError",
    "Kimi",
    "KimiConfig",
    "TextConfig",
    "UnsupportedConfigError",
    "convert",
    "expand_media_placeholders",
    "generate",
    "kimi_k25_config",
    "load",
]
