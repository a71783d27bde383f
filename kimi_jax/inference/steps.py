"""Compiled steps on the compressed MLA cache, and :class:`BatchEngine`: prefill and decode
of one fixed batch over an explicit cache (the serving engine, ``kimi_jax.inference.engine``,
shares :func:`key_block_for`; its own steps call the same ``TextModel.extend``).

One pure step serves both phases, :func:`extend_step`: (parameters, tokens, counts, cache)
-> (logits at each row's last new token, cache), jit-compiled with the cache donated, so the
cache is updated in place. Positions are not passed: row ``b``'s new tokens continue at
``cache.lengths[b]``.

- **Padding**: prompts are right-padded. Each row's tokens sit at positions 0, 1, ... of its
  own, exactly as if it ran alone, and no position offsets or key-padding masks are needed.
- **Prefill** feeds the prompts in chunks of at most ``prefill_chunk`` tokens; each chunk's
  latents are written into the cache, then its queries attend over the cache (earlier
  chunks included), in MLA's expanded or absorbed form, whichever costs fewer flops for
  the chunk's length (:func:`kimi_jax.model.mla.absorbed_is_cheaper`; expanded from about
  170 tokens for K2.5).
- **Decode** feeds one token per row and always uses the absorbed form: the cache is never
  expanded to per-head keys and values. Finished rows are fed with a count of 0, so their
  cache and length stay as they are.
- **Media**: a prefill may carry the prompts' media (``pixel_values`` / ``grid_thws``, the
  prompts holding one ``<|media_pad|>`` per media token). The vision tower encodes them once
  (:func:`embed_step`), the features are spliced into the prompts' embeddings, and the
  chunks are fed as embeddings instead of ids; decode is unchanged.
- **Long caches** are attended in key blocks with an online softmax (``MLA.attend_cache``),
  so a step's scores are [B, N, T, key block] within :data:`SCORE_BYTES` per layer (never
  prompt x prompt, nor chunk x whole cache), and blocks past the last position are not read.

Shapes are static: a fixed batch and cache length, prefill chunks of one length, so decode
compiles once per batch and cache length.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.config.model import TextConfig
from kimi_jax.media.placeholders import check_expanded
from kimi_jax.model.cache import KVCache
from kimi_jax.model.inputs import check_prompts
from kimi_jax.model.kimi import Kimi, media_grids
from kimi_jax.model.mla import absorbed_is_cheaper
from kimi_jax.model.vision import Grid
from kimi_jax.parallel.placement import to_host

ATTENTION_FORMS = ("auto", "absorbed", "expanded")
SCORE_BYTES = 1 << 30
"""Budget for one layer's attention scores (float32 [B, N, T, key block]) when choosing the key block."""
MAX_KEY_BLOCK = 8192
"""Longest key block: caches longer than this are attended block by block, skipping empty blocks."""
CACHE_ROUNDING = 128
"""Default cache lengths are rounded up to a multiple of this, so similar requests share compiled steps."""


@functools.partial(jax.jit, static_argnames=("graphdef", "absorbed", "key_block"), donate_argnames="cache")
def extend_step(
    graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array | None, counts: jax.Array, cache: KVCache,
    inputs_embeds: jax.Array | None = None, *, absorbed: bool, key_block: int,
) -> tuple[jax.Array, KVCache]:
    """Appends ``counts[b]`` tokens of row ``b`` of ``input_ids`` [B, T] (or of their
    embeddings ``inputs_embeds`` [B, T, D]) to the cache (donated).

    ``graphdef`` / ``state`` are ``nnx.split`` of the :class:`~kimi_jax.model.decoder.TextModel`.
    Returns logits [B, V] (float32) at each row's last new token and the updated cache.
    """
    return nnx.merge(graphdef, state).extend(
        input_ids, counts, cache, absorbed=absorbed, key_block=key_block, inputs_embeds=inputs_embeds
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "grids"))
def embed_step(
    graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, is_media: jax.Array, pixel_values: jax.Array,
    grids: tuple[Grid, ...],
) -> jax.Array:
    """Embeddings [B, T, D] of ``input_ids`` [B, T] with the features of the media ``grids``
    spliced in where ``is_media`` holds; ``graphdef`` / ``state`` are ``nnx.split`` of the
    :class:`~kimi_jax.model.Kimi` model."""
    return nnx.merge(graphdef, state).spliced_embeddings(input_ids, is_media, pixel_values, grids)


def key_block_for(cfg: TextConfig, batch: int, num_queries: int, cache_length: int, key_block: int | None) -> int:
    """Cache slots attention scores at once: ``key_block`` if given, else the most (a multiple
    of 128, at most :data:`MAX_KEY_BLOCK`) whose scores fit :data:`SCORE_BYTES`."""
    if key_block is not None:
        if key_block < 1:
            raise ValueError(f"key_block must be >= 1, got {key_block}")
        return min(key_block, cache_length)
    per_slot = batch * num_queries * cfg.num_attention_heads * 4
    return min(MAX_KEY_BLOCK, max(128, SCORE_BYTES // per_slot // 128 * 128), cache_length)


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class BatchEngine:
    """Prefill and decode of one fixed batch over an explicit :class:`~kimi_jax.model.cache.KVCache`.

    ``BatchEngine(model)`` holds the model's current parameters (build a new one after
    changing them). The reference the serving engine is tested against, and the way to
    drive the cache by hand (notebooks, parity tests).
    """

    def __init__(self, model: Kimi, *, key_block: int | None = None):
        self.config = model.config.text
        self.vision = model.vision_config
        self.placeholder_id = model.config.media_placeholder_token_id
        self.parallel = model.parallel
        self.graphdef, self.state = nnx.split(model.language_model)
        self._whole = nnx.split(model) if self.vision is not None else None
        if key_block is not None and key_block < 1:
            raise ValueError(f"key_block must be >= 1, got {key_block}")
        self._key_block = key_block

    def key_block(self, batch: int, num_queries: int, cache_length: int) -> int:
        """:func:`key_block_for` with this engine's ``key_block``."""
        return key_block_for(self.config, batch, num_queries, cache_length, self._key_block)

    def new_cache(self, batch: int, length: int, dtype: jnp.dtype = jnp.bfloat16) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``length`` tokens (split over the
        batch's mesh axes when the model runs on a mesh)."""
        cache = KVCache.create(self.config, batch, length, jnp.dtype(dtype))
        return cache if self.parallel is None else self.parallel.place_batch(cache)

    def _check_prompts(self, prompts: Sequence[Sequence[int]], start: Sequence[int], cache_length: int) -> None:
        """Raises ``ValueError`` for a prompt that does not fit after ``start`` cached tokens in
        the cache or the model's context (the ids themselves are checked by :func:`check_prompts`)."""
        context = self.config.max_position_embeddings
        for i, (prompt, offset) in enumerate(zip(prompts, start, strict=True)):
            end = offset + len(prompt)
            where = f"prompt {i} has {len(prompt)} tokens" + (f" after {offset} cached" if offset else "")
            if end > context:
                raise ValueError(f"{where}: longer than the model's context (max_position_embeddings = {context})")
            if end > cache_length:
                raise ValueError(f"{where}: longer than the cache ({cache_length} tokens)")

    def prefill(
        self, prompts: Sequence[Sequence[int]], cache: KVCache, *, chunk: int = 512, attention: str = "auto",
        pixel_values: np.ndarray | None = None, grid_thws: np.ndarray | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Appends prompt ``b`` to row ``b`` of the cache; logits [B, V] at each prompt's last token.

        Prompts are fed in chunks of ``min(chunk, next power of two >= longest prompt)``
        tokens. ``attention`` is ``"auto"`` (fewer flops, see the module doc), ``"absorbed"``
        or ``"expanded"``. ``pixel_values`` / ``grid_thws`` are the media of all prompts in
        order (as :class:`~kimi_jax.model.Kimi` takes them): the prompts must hold one
        ``<|media_pad|>`` per media token.
        """
        if attention not in ATTENTION_FORMS:
            raise ValueError(f"unknown attention form {attention!r}; choose from {ATTENTION_FORMS}")
        if chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
        if len(prompts) != cache.batch:
            raise ValueError(f"{len(prompts)} prompts for a cache of batch {cache.batch}")
        prompts = check_prompts(prompts, self.config.vocab_size)
        self._check_prompts(prompts, to_host(cache.lengths).tolist(), cache.length)
        lengths = np.array([len(p) for p in prompts], np.int32)
        T = min(chunk, _next_power_of_two(int(lengths.max())))
        n_chunks = -(-int(lengths.max()) // T)
        ids = np.zeros((len(prompts), n_chunks * T), np.int32)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        embeds = self._media_embeddings(ids, lengths, pixel_values, grid_thws)
        absorbed = attention == "absorbed" or (attention == "auto" and absorbed_is_cheaper(self.config, T))
        key_block = self.key_block(cache.batch, T, cache.length)
        last = None
        for k in range(n_chunks):
            counts = np.clip(lengths - k * T, 0, T).astype(np.int32)
            chunk_ids, chunk_embeds = ids[:, k * T : (k + 1) * T], None
            if embeds is not None:
                chunk_ids, chunk_embeds = None, embeds[:, k * T : (k + 1) * T]
            logits, cache = extend_step(
                self.graphdef, self.state, chunk_ids, counts, cache, chunk_embeds,
                absorbed=absorbed, key_block=key_block,
            )
            last = logits if last is None else jnp.where(counts[:, None] > 0, logits, last)
        return last, cache

    def _media_embeddings(
        self, ids: np.ndarray, lengths: np.ndarray, pixel_values: np.ndarray | None, grid_thws: np.ndarray | None,
    ) -> jax.Array | None:
        """The padded prompts' ``ids`` [B, L] as embeddings with their media spliced in (None without media)."""
        grids = media_grids(self.vision, pixel_values, grid_thws)
        if not grids:
            return None
        is_media = (ids == self.placeholder_id) & (np.arange(ids.shape[1]) < lengths[:, None])
        check_expanded(int(is_media.sum()), grids, self.vision.merge_kernel_size)
        graphdef, state = self._whole
        return embed_step(graphdef, state, ids, is_media, jnp.asarray(pixel_values), grids)

    def decode(self, tokens: jax.Array, cache: KVCache, active: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Appends one token per row, ``tokens`` [B]; logits [B, V] for the next one.

        Rows where ``active`` [B] is False are left unchanged (their logits are meaningless).
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        counts = jnp.ones_like(tokens) if active is None else jnp.asarray(active, jnp.int32)
        key_block = self.key_block(cache.batch, 1, cache.length)
        return extend_step(
            self.graphdef, self.state, tokens[:, None], counts, cache, absorbed=True, key_block=key_block
        )
