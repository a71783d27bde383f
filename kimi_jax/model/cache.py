"""The compressed MLA key/value cache, an explicit pytree.

Einsum letters: B batch, T new positions, S cache slots, C kv latent (kv_lora_rank), R rope dim.

Per layer the cache holds only what MLA's absorbed form attends over: the normalized latent
``c_kv`` [B, S, C] and the roped shared key ``k_pe`` [B, S, R], i.e. ``kv_lora_rank +
qk_rope_head_dim`` values per token per layer (576 for K2.5, 1152 bytes in bfloat16).

Sequence ``b`` occupies slots ``0 .. lengths[b] - 1``, slot = position. Each step appends a
row's new tokens at its own length (sequences are right-padded), so rows of different
lengths share one static-shape cache; slots past a row's length hold stale values that the
causal mask (slot <= query position) never shows before they are overwritten.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kimi_jax.config.model import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's cache: latent ``c_kv`` [B, S, C] and roped key ``k_pe`` [B, S, R]."""

    c_kv: jax.Array
    k_pe: jax.Array

    def write(self, positions: jax.Array, c_kv: jax.Array, k_pe: jax.Array) -> LayerCache:
        """Stores new entries ``c_kv`` [B, T, C] and ``k_pe`` [B, T, R] at slots ``positions`` [B, T].

        Values are cast to the cache's dtype; positions past the cache's end are dropped.
        """
        rows = jnp.arange(positions.shape[0])[:, None]
        return LayerCache(
            self.c_kv.at[rows, positions].set(c_kv.astype(self.c_kv.dtype), mode="drop"),
            self.k_pe.at[rows, positions].set(k_pe.astype(self.k_pe.dtype), mode="drop"),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """All layers' caches plus the number of tokens each sequence holds, ``lengths`` [B] (int32)."""

    layers: tuple[LayerCache, ...]
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: TextConfig, batch: int, length: int, dtype: jnp.dtype = jnp.bfloat16) -> KVCache:
        """An empty cache of ``length`` slots for ``batch`` sequences of the model ``cfg``."""
        if length < 1 or batch < 1:
            raise ValueError(f"a cache needs at least one sequence and one slot, got batch {batch}, length {length}")
        C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        layers = tuple(
            LayerCache(jnp.zeros((batch, length, C), dtype), jnp.zeros((batch, length, R), dtype))
            for _ in range(cfg.num_hidden_layers)
        )
        return cls(layers, jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def length(self) -> int:
        """Slots per sequence (S)."""
        return self.layers[0].c_kv.shape[1]

    @property
    def dtype(self) -> jnp.dtype:
        return self.layers[0].c_kv.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the latents and rope keys of all layers (the lengths not counted)."""
        return sum(layer.c_kv.nbytes + layer.k_pe.nbytes for layer in self.layers)

    @property
    def bytes_per_token_per_layer(self) -> int:
        """Bytes one cached token takes in one layer: (kv_lora_rank + qk_rope_head_dim) x dtype size."""
        return self.nbytes // (len(self.layers) * self.batch * self.length)
