"""The compressed MLA key/value cache, an explicit pytree.

Einsum letters: B batch, L layers of a run, T new positions, S cache slots, C kv latent
(kv_lora_rank), R rope dim.

Per layer the cache holds only what MLA's absorbed form attends over: the normalized latent
``c_kv`` and the roped shared key ``k_pe``, i.e. ``kv_lora_rank + qk_rope_head_dim`` values
per token per layer (576 for K2.5, 1152 bytes in bfloat16). The layers are scanned in runs
(``TextConfig.layer_runs``), so the cache holds one :class:`LayerCache` per run,
its layers stacked after the batch axis: ``c_kv`` [B, L, S, C], ``k_pe`` [B, L, S, R]. A
layer step reads and writes its own layer of the stack in place (no copy of the stack).

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
    """The cache of one run of layers: latents ``c_kv`` [B, L, S, C] and roped keys ``k_pe`` [B, L, S, R]."""

    c_kv: jax.Array
    k_pe: jax.Array

    def write(self, layer: jax.Array, positions: jax.Array, c_kv: jax.Array, k_pe: jax.Array,
              rows: jax.Array | None = None) -> LayerCache:
        """Stores layer ``layer``'s new entries ``c_kv`` [n, T, C] and ``k_pe`` [n, T, R] at
        slots ``positions`` [n, T] of sequences ``rows`` [n] (distinct; None: all, n = B), in
        place. Values are cast to the cache's dtype; positions outside ``[0, S)`` are dropped."""
        rows = jnp.arange(positions.shape[0]) if rows is None else rows
        positions = jnp.where(positions < 0, self.c_kv.shape[2], positions)  # not from the end, as indexing would
        return LayerCache(
            self.c_kv.at[rows[:, None], layer, positions].set(c_kv.astype(self.c_kv.dtype), mode="drop"),
            self.k_pe.at[rows[:, None], layer, positions].set(k_pe.astype(self.k_pe.dtype), mode="drop"),
        )

    def layer(self, layer: jax.Array, rows: jax.Array | None = None, start: jax.Array | int = 0,
              size: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Layer ``layer``'s latents [n, size, C] and roped keys [n, size, R]: slots ``start ..
        start + size - 1`` (default all) of sequences ``rows`` [n] (None: all, n = B). Only those
        entries are read (a slice or a gather, never a copy of the stack)."""
        size = self.c_kv.shape[2] if size is None else size
        if rows is None:
            return tuple(jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(a, layer, 1, keepdims=False),
                                                      start, size, axis=1) for a in (self.c_kv, self.k_pe))

        def one(a, row):
            return jax.lax.dynamic_slice(a, (row, layer, start, 0), (1, 1, size, a.shape[3]))[0, 0]

        return tuple(jax.vmap(one, in_axes=(None, 0))(a, rows) for a in (self.c_kv, self.k_pe))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The caches of all runs of layers plus the number of tokens each sequence holds, ``lengths`` [B] (int32)."""

    runs: tuple[LayerCache, ...]
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: TextConfig, batch: int, length: int, dtype: jnp.dtype = jnp.bfloat16) -> KVCache:
        """An empty cache of ``length`` slots for ``batch`` sequences of the model ``cfg``."""
        if length < 1 or batch < 1:
            raise ValueError(f"a cache needs at least one sequence and one slot, got batch {batch}, length {length}")
        C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        runs = tuple(
            LayerCache(jnp.zeros((batch, count, length, C), dtype), jnp.zeros((batch, count, length, R), dtype))
            for _, count in cfg.layer_runs
        )
        return cls(runs, jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def length(self) -> int:
        """Slots per sequence (S)."""
        return self.runs[0].c_kv.shape[2]

    @property
    def num_layers(self) -> int:
        return sum(run.c_kv.shape[1] for run in self.runs)

    @property
    def dtype(self) -> jnp.dtype:
        return self.runs[0].c_kv.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the latents and rope keys of all layers (the lengths not counted)."""
        return sum(run.c_kv.nbytes + run.k_pe.nbytes for run in self.runs)

    @property
    def bytes_per_token_per_layer(self) -> int:
        """Bytes one cached token takes in one layer: (kv_lora_rank + qk_rope_head_dim) x dtype size."""
        return self.nbytes // (self.num_layers * self.batch * self.length)
