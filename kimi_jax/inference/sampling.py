"""Next-token selection from logits: greedy, temperature, top-k and top-p (nucleus).

Shapes: B batch, V vocabulary. The filters set excluded logits to ``-inf`` and are applied
in transformers' order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from types import MappingProxyType

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature == 0`` is greedy (argmax); ``top_k == 0`` and
    ``top_p == 1`` switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


RECOMMENDED_SAMPLING: Mapping[str, Sampling] = MappingProxyType({
    "thinking": Sampling(temperature=1.0, top_p=0.95),
    "instant": Sampling(temperature=0.6, top_p=0.95),
})
"""Moonshot's recommended sampling for each mode."""


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the ``k`` largest logits of each row [B, V] (and any tied with the k-th)."""
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][:, -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps, per row [B, V], the most likely tokens whose probabilities first reach ``p`` in sum.

    A token is kept when the mass of the tokens more likely than it is below ``p``, so the
    most likely token always stays; tokens tied with the last kept one stay too.
    """
    sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row of ``logits`` [B, V] -> [B] (int32), drawn with ``key``.

    Temperature and top-p are traced values, so changing them does not recompile; greedy
    decoding, top-k and whether top-p is on select the compiled variant.
    """
    return _sample(logits, key, jnp.float32(sampling.temperature or 1.0), jnp.float32(sampling.top_p),
                   greedy=sampling.temperature == 0, top_k=sampling.top_k, use_top_p=sampling.top_p < 1)


@functools.partial(jax.jit, static_argnames=("greedy", "top_k", "use_top_p"))
def _sample(logits, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
