"""Kimi K2.5 in JAX and Flax NNX."""

from kimi_jax.checkpoint.convert import ConversionError, convert
from kimi_jax.checkpoint.integrity import ChecksumError, verify
from kimi_jax.checkpoint.load import load
from kimi_jax.config.model import (
    KimiConfig,
    TextConfig,
    UnsupportedConfigError,
    kimi_k25_config,
)
from kimi_jax.inference.engine import Engine
from kimi_jax.inference.generate import generate
from kimi_jax.media.placeholders import expand_media_placeholders
from kimi_jax.model import Kimi

__all__ = [
    "Engine",
    "ChecksumError",
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
    "verify",
]
