"""Next-token selection from logits: greedy, temperature, top-k and top-p (nucleus).

Shapes: B batch, V vocabulary. The filters set excluded logits to ``-inf`` and are applied
in transformers' order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses
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


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Top-k, then top-p, per row of ``logits`` [B, V] with the row's ``top_p`` / ``top_k`` [B]
    (1 / 0: off); excluded logits become ``-inf``.

    Top-k keeps the ``k`` largest (and any tied with the k-th). Top-p then keeps the most
    likely tokens whose probabilities (renormalized after top-k) first reach ``p`` in sum:
    a token stays when the mass of the tokens more likely than it is below ``p``, so the
    most likely token always stays, and so do ties with the last kept one.
    """
    V = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ordered = jnp.where(jnp.arange(V) < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)  # float32 sums can reach 1 early
    cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= jnp.maximum(cutoff, kth), logits, -jnp.inf)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """:func:`filter_logits` with top-k alone, the same ``k`` for every row."""
    B = logits.shape[0]
    return filter_logits(logits, jnp.ones((B,), jnp.float32), jnp.full((B,), k, jnp.int32))


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """:func:`filter_logits` with top-p alone, the same ``p`` for every row."""
    B = logits.shape[0]
    return filter_logits(logits, jnp.full((B,), p, jnp.float32), jnp.zeros((B,), jnp.int32))


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row of ``logits`` [B, V] -> [B] (int32), all rows with ``sampling``;
    row ``b`` draws with ``fold_in(key, b)``."""
    B = logits.shape[0]
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(B))
    return _sample_rows(
        logits, keys, jnp.full((B,), sampling.temperature, jnp.float32), jnp.full((B,), sampling.top_p, jnp.float32),
        jnp.full((B,), sampling.top_k, jnp.int32),
        filtered=filters(sampling.temperature, sampling.top_p, sampling.top_k),
    )


def filters(temperature: float, top_p: float, top_k: int) -> bool:
    """Whether a row with these settings needs :func:`sample_rows`' ``filtered=True``."""
    return temperature > 0 and (top_k > 0 or top_p < 1)


def sample_rows(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array, *,
    filtered: bool = True,
) -> jax.Array:
    """One token per row of ``logits`` [B, V] with the row's own settings, all [B]: ``keys``
    (typed PRNG keys), ``temperature`` (0: greedy), ``top_p`` (1: off), ``top_k`` (0: off).

    Applied in transformers' order: temperature, then top-k, then top-p (on the top-k
    renormalized distribution); ties with the last kept logit stay. Traceable, for use
    inside compiled steps. ``filtered=False`` skips the filters (a sort of the vocabulary)
    for callers that know on the host that no row :func:`filters`; a row that does is then
    drawn from its whole distribution. Nothing branches on the device: a conditional on a
    GPU makes the host wait for its predicate, so a step could not be queued ahead.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if filtered:
        scaled = filter_logits(scaled, top_p, top_k)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


_sample_rows = jax.jit(sample_rows, static_argnames="filtered")
