"""The Kimi K2 / K2.5 decoder and the top-level model.

Einsum letters: B batch, T positions, D model, V vocabulary, N media tokens.

``Kimi`` mirrors the checkpoint's top level: ``language_model`` and, when the config has a
``vision_config`` (K2.5), MoonViT's ``vision_tower`` and ``mm_projector``
(``kimi_jax.vision.tower``). :meth:`Kimi.trace` runs the model and returns named per-layer
activations and routing decisions alongside the logits. :meth:`TextModel.extend` is the
cached step generation is built on (``kimi_jax.engine``).

Media: the input ids hold one ``<|media_pad|>`` (``media_placeholder_token_id``) per merged
vision token, the media in order (``kimi_jax.vision.media.expand_media_placeholders`` turns
the processor's one placeholder per medium into that); the embeddings at those positions are
*replaced* by the projected vision features (:func:`splice_media`). Positions stay 1-D: a
media token takes one position like any other token.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kimi_jax.attention import MLA
from kimi_jax.cache import KVCache, LayerCache
from kimi_jax.config import KimiConfig, TextConfig, UnsupportedConfigError
from kimi_jax.layers import rms_norm, rope_attention_factor, rope_table, weight, yarn_inv_freq
from kimi_jax.moe import MLP, MoE
from kimi_jax.sharding import Layout, constrain, layout_scope
from kimi_jax.vision.media import check_expanded
from kimi_jax.vision.tower import Grid, Projector, VisionConfig, VisionTower, as_grids, project_media


ACTIVATION_AXES = ("batch", None, None)
"""Logical axes of the hidden states [B, T, D] between layers."""


class DecoderLayer(nnx.Module):
    """``h = x + attn(norm(x)); out = h + mlp(norm(h))``; the MLP is dense or MoE."""

    def __init__(
        self, cfg: TextConfig, index: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, moe_impl: str, expert_format: str
    ):
        self.eps = cfg.rms_norm_eps
        self.capture = False
        D = cfg.hidden_size
        self.input_layernorm = weight(rngs, (D,), ("norm",), dtype, init="ones")
        self.self_attn = MLA(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = weight(rngs, (D,), ("norm",), dtype, init="ones")
        if cfg.is_moe_layer(index):
            self.mlp = MoE(cfg, dtype=dtype, rngs=rngs, impl=moe_impl, expert_format=expert_format)
        else:
            self.mlp = MLP(D, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        normed = rms_norm(x, self.input_layernorm[...], self.eps)
        return self._residual(x, normed, self.self_attn(normed, cos, sin, mask))

    def cached(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array, cache: LayerCache, *,
        absorbed: bool, key_block: int,
    ) -> tuple[jax.Array, LayerCache]:
        """The layer over new tokens at ``positions``, attending over (and writing) ``cache``."""
        normed = rms_norm(x, self.input_layernorm[...], self.eps)
        attn, cache = self.self_attn.cached(normed, cos, sin, positions, cache, absorbed=absorbed, key_block=key_block)
        return self._residual(x, normed, attn), cache

    def _residual(self, x: jax.Array, normed: jax.Array, attn: jax.Array) -> jax.Array:
        h = x + attn
        mlp = self.mlp(rms_norm(h, self.post_attention_layernorm[...], self.eps))
        if self.capture:
            self.sow(nnx.Intermediate, "input_norm", normed)
            self.sow(nnx.Intermediate, "attn_out", attn)
            self.sow(nnx.Intermediate, "mlp_out", mlp)
        return h + mlp


class TextModel(nnx.Module):
    """Embedding, decoder layers, final norm and the (untied) lm_head."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        moe_impl: str = "grouped",
        expert_format: str = "dense",
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.capture = False
        self.parallel: tuple[Mesh, Layout] | None = None  # set by sharding.shard_model / load(mesh=...)
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = weight(rngs, (V, D), ("vocab", "embed"), dtype)
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, i, dtype=dtype, rngs=rngs, moe_impl=moe_impl, expert_format=expert_format)
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = weight(rngs, (D,), ("norm",), dtype, init="ones")
        self.lm_head = weight(rngs, (D, V), ("embed", "vocab"), dtype)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B, T, R/2] for ``positions`` [B, T]; computed once per step."""
        inv_freq = jnp.asarray(yarn_inv_freq(self.cfg))
        return rope_table(positions, inv_freq, rope_attention_factor(self.cfg))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0)

    def _inputs(self, input_ids: jax.Array | None, inputs_embeds: jax.Array | None) -> jax.Array:
        """The hidden states [B, T, D] to start from: ``inputs_embeds`` or the embedding of ``input_ids``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass either input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        return constrain(x, ACTIVATION_AXES)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and lm_head; logits in float32."""
        h = rms_norm(hidden, self.norm[...], self.cfg.rms_norm_eps)
        if self.capture:
            self.sow(nnx.Intermediate, "final_norm", h)
        return jnp.einsum("btd,dv->btv", h, self.lm_head[...], preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Full-sequence forward: ``input_ids`` [B, T] (or their embeddings ``inputs_embeds``
        [B, T, D], e.g. with media spliced in) -> logits [B, T, V] (float32).

        ``positions`` default to 0..T-1; ``attention_mask`` [B, T] marks real tokens (keys
        where it is 0 are never attended to).
        """
        B, T = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = jnp.tril(jnp.ones((T, T), bool))[None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        mask = jnp.broadcast_to(mask, (B, T, T))
        cos, sin = self.rope(positions)
        with layout_scope(self.parallel):
            x = self._inputs(input_ids, inputs_embeds)
            if self.capture:
                self.sow(nnx.Intermediate, "embed", x)
            for layer in self.layers:
                x = constrain(layer(x, cos, sin, mask), ACTIVATION_AXES)
            return self.logits(x)

    def extend(
        self, input_ids: jax.Array | None, counts: jax.Array, cache: KVCache, *, absorbed: bool, key_block: int,
        inputs_embeds: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Appends tokens to the cache; logits [B, V] (float32) at each row's last new token.

        The tokens come as ``input_ids`` [B, T] or as their embeddings ``inputs_embeds``
        [B, T, D] (a prefill with media spliced in). Row ``b`` holds ``counts[b]`` new tokens
        followed by padding; they take positions ``cache.lengths[b] + 0..T-1`` and each attends
        to the cache slots up to its own position. Padding writes only slots past the row's new
        length, which later tokens overwrite before any query sees them. A row with count 0
        keeps its length (its logits are meaningless). ``absorbed`` selects MLA's form, ``key_block``
        how many cache slots attention scores at once (``MLA.cached``).
        """
        T = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
        cos, sin = self.rope(positions)
        layers = []
        with layout_scope(self.parallel):
            x = self._inputs(input_ids, inputs_embeds)
            for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
                x, layer_cache = layer.cached(
                    x, cos, sin, positions, layer_cache, absorbed=absorbed, key_block=key_block
                )
                x = constrain(x, ACTIVATION_AXES)
                layers.append(layer_cache)
            last = jnp.take_along_axis(x, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)
            return self.logits(last)[:, 0], KVCache(tuple(layers), cache.lengths + counts)


def splice_media(embeds: jax.Array, is_media: jax.Array, features: jax.Array) -> jax.Array:
    """``embeds`` [B, T, D] with the positions where ``is_media`` [B, T] holds replaced by the
    rows of ``features`` [N, D] in row-major order (N must be the number of such positions)."""
    order = jnp.cumsum(is_media.reshape(-1)) - 1
    rows = jnp.take(features, jnp.clip(order, 0, features.shape[0] - 1), axis=0).reshape(embeds.shape)
    return jnp.where(is_media[..., None], rows.astype(embeds.dtype), embeds)


class Kimi(nnx.Module):
    """Kimi K2 / K2.5: ``model(input_ids)`` [B, T] -> logits [B, T, V]; with media
    ``model(input_ids, pixel_values=..., grid_thws=...)``.

    ``expert_format`` selects how the routed experts are stored (see ``kimi_jax.moe``);
    ``vision_attention`` the vision tower's attention implementation (see
    :class:`~kimi_jax.vision.tower.MoonViT`).
    """

    def __init__(
        self,
        config: KimiConfig,
        *,
        dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs | None = None,
        moe_impl: str = "grouped",
        expert_format: str = "dense",
        vision_attention: str | None = None,
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.language_model = TextModel(
            config.text, dtype=self.dtype, rngs=rngs, moe_impl=moe_impl, expert_format=expert_format
        )
        vision = VisionConfig.from_dict(config.vision_config) if config.is_multimodal else None
        if vision is not None:
            if vision.text_hidden_size != config.text.hidden_size:
                raise UnsupportedConfigError(
                    f"config: vision_config.text_hidden_size={vision.text_hidden_size} differs from the decoder's "
                    f"hidden_size={config.text.hidden_size}"
                )
            if config.media_placeholder_token_id is None:
                raise UnsupportedConfigError("config: a vision_config needs a 'media_placeholder_token_id'")
        self.vision_tower = None if vision is None else VisionTower(vision, rngs, self.dtype, vision_attention)
        self.mm_projector = None if vision is None else Projector(vision, rngs, self.dtype)

    @property
    def vision_config(self) -> VisionConfig | None:
        """The parsed ``vision_config`` (None for a text-only model)."""
        return None if self.vision_tower is None else self.vision_tower.cfg

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        pixel_values: jax.Array | None = None,
        grid_thws: Any = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] (float32) for ``input_ids`` [B, T]; compiled once per shape and set of grids.

        ``pixel_values`` [sum T*H*W, 3, p, p] and ``grid_thws`` [M, 3] (as
        ``kimi_jax.vision.preprocess.preprocess_media`` returns them) are the media of all
        rows in order; ``input_ids`` then hold one ``<|media_pad|>`` per media token
        (expanded, see the module doc). ``positions`` default to 0..T-1; ``attention_mask``
        [B, T] marks real tokens.
        """
        ids = jnp.asarray(input_ids)
        grids = self._media_grids(input_ids, pixel_values, grid_thws)
        pixels = None if not grids else jnp.asarray(pixel_values)
        return _forward(self, ids, pixels, grids, positions, attention_mask)

    def embed_inputs(self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None,
                     grid_thws: Any = None) -> jax.Array:
        """The decoder's input embeddings [B, T, D]: token embeddings with the media features
        spliced in (arguments as for ``__call__``)."""
        grids = self._media_grids(input_ids, pixel_values, grid_thws)
        ids = jnp.asarray(input_ids)
        pixels = None if not grids else jnp.asarray(pixel_values)
        return _embed(self, ids, ids == self._placeholder_id(), pixels, grids)

    def spliced_embeddings(
        self, input_ids: jax.Array, is_media: jax.Array, pixel_values: jax.Array | None, grids: tuple[Grid, ...]
    ) -> jax.Array:
        """Token embeddings [B, T, D] of ``input_ids``, the features of the media ``grids``
        (static) spliced in where ``is_media`` [B, T] holds."""
        x = self.language_model.embed(input_ids)
        if not grids:
            return x
        with jax.named_scope("vision"):
            features = project_media(self.vision_tower, self.mm_projector, pixel_values, grids)
        return splice_media(x, is_media, features)

    def _placeholder_id(self) -> int:
        return -1 if self.config.media_placeholder_token_id is None else self.config.media_placeholder_token_id

    def _media_grids(self, input_ids: Any, pixel_values: Any, grid_thws: Any) -> tuple[Grid, ...]:
        """:func:`media_grids`, also checked against the placeholders of concrete ``input_ids``."""
        grids = media_grids(self.vision_config, pixel_values, grid_thws)
        if grids and not isinstance(input_ids, jax.core.Tracer):
            placeholders = int((np.asarray(input_ids) == self._placeholder_id()).sum())
            check_expanded(placeholders, grids, self.vision_config.merge_kernel_size)
        return grids

    def trace(
        self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None, grid_thws: Any = None, **kwargs
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits plus named intermediates: ``embed`` (media spliced in), per layer
        ``input_norm``, ``attn_out``, ``mlp_out`` and, in MoE layers, ``router_scores`` [T, E],
        ``router_idx`` / ``router_weights`` [T, K], keyed like ``"layers.1.router_idx"``
        (T = batch x sequence, flattened), and ``final_norm``.
        """
        inputs = {"inputs_embeds": self.embed_inputs(input_ids, pixel_values=pixel_values, grid_thws=grid_thws)}
        self.set_attributes(capture=True, raise_if_not_found=False)
        try:
            logits, inter = nnx.capture(self.language_model, nnx.Intermediate)(**inputs, **kwargs)
        finally:
            self.set_attributes(capture=False, raise_if_not_found=False)
        named = {}
        for path, value in nnx.to_flat_state(inter):
            keep = [str(p) for p in path if p not in ("language_model", "mlp")]
            named[".".join(keep)] = value.get_value()[0]
        return logits, named

    def set_moe_impl(self, impl: str) -> None:
        """Switch every MoE layer between the ``grouped`` and ``reference`` expert paths."""
        for layer in self.language_model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.set_impl(impl)


def media_grids(vision: VisionConfig | None, pixel_values: Any, grid_thws: Any) -> tuple[Grid, ...]:
    """``grid_thws`` as static grids (empty without media) for a model with the vision config
    ``vision``; ``ValueError`` if only one of ``pixel_values`` / ``grid_thws`` is given or the
    model has no vision tower."""
    if pixel_values is None and grid_thws is None:
        return ()
    if pixel_values is None or grid_thws is None:
        raise ValueError("pass pixel_values and grid_thws together")
    if vision is None:
        raise ValueError("this model has no vision tower (its config has no vision_config); it takes no media")
    return as_grids(grid_thws, vision)


@nnx.jit(static_argnames="grids")
def _embed(model: Kimi, input_ids: jax.Array, is_media: jax.Array, pixel_values: jax.Array | None,
           grids: tuple[Grid, ...]) -> jax.Array:
    return model.spliced_embeddings(input_ids, is_media, pixel_values, grids)


@nnx.jit(static_argnames="grids")
def _forward(
    model: Kimi, input_ids: jax.Array, pixel_values: jax.Array | None, grids: tuple[Grid, ...],
    positions: jax.Array | None, attention_mask: jax.Array | None,
) -> jax.Array:
    if not grids:
        return model.language_model(input_ids, positions=positions, attention_mask=attention_mask)
    embeds = model.spliced_embeddings(input_ids, input_ids == model._placeholder_id(), pixel_values, grids)
    return model.language_model(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask)
