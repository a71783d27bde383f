"""``Kimi``: the whole K2 / K2.5 model, mirroring the checkpoint's top level.

Einsum letters: B batch, T positions, D model, N media tokens.

``language_model`` is the text decoder (``kimi_jax.model.decoder``); when the config has a
``vision_config`` (K2.5), MoonViT's ``vision_tower`` and ``mm_projector``
(``kimi_jax.model.vision``) come with it. :meth:`Kimi.trace` runs the model and returns
named per-layer activations and routing decisions alongside the logits.

Media: the input ids hold one ``<|media_pad|>`` (``media_placeholder_token_id``) per merged
vision token, the media in order (``kimi_jax.media.placeholders.expand_media_placeholders``
turns the processor's one placeholder per medium into that); the embeddings at those
positions are *replaced* by the projected vision features (:func:`splice_media`, the one
place where that happens). Positions stay 1-D: a media token takes one position like any
other token.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.config.model import KimiConfig, UnsupportedConfigError
from kimi_jax.media.placeholders import check_expanded
from kimi_jax.model.decoder import TextModel
from kimi_jax.model.inputs import check_token_ids
from kimi_jax.model.moe import MoE
from kimi_jax.model.vision import (
    Grid,
    Projector,
    VisionConfig,
    VisionTower,
    as_grids,
    project_media,
)
from kimi_jax.parallel.placement import Parallel


def splice_media(embeds: jax.Array, is_media: jax.Array, features: jax.Array) -> jax.Array:
    """``embeds`` [B, T, D] with the positions where ``is_media`` [B, T] holds replaced by the
    rows of ``features`` [N, D] in row-major order (N must be the number of such positions)."""
    order = jnp.cumsum(is_media.reshape(-1)) - 1
    rows = jnp.take(features, jnp.clip(order, 0, features.shape[0] - 1), axis=0).reshape(embeds.shape)
    return jnp.where(is_media[..., None], rows.astype(embeds.dtype), embeds)


class Kimi(nnx.Module):
    """Kimi K2 / K2.5: ``model(input_ids)`` [B, T] -> logits [B, T, V]; with media
    ``model(input_ids, pixel_values=..., grid_thws=...)``.

    ``expert_format`` selects how the routed experts are stored (see ``kimi_jax.model.moe``);
    ``vision_attention`` the vision tower's attention implementation (see
    :class:`~kimi_jax.model.vision.MoonViT`); ``parallel`` the mesh and layout the model
    runs on (None: one device, no constraints).
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
        parallel: Parallel | None = None,
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.moe_impl, self.expert_format, self.vision_attention = moe_impl, expert_format, vision_attention
        self.parallel = parallel
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.language_model = TextModel(
            config.text, dtype=self.dtype, rngs=rngs, moe_impl=moe_impl, expert_format=expert_format,
            parallel=parallel,
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

    def rebuild(self, parallel: Parallel | None) -> Kimi:
        """An abstract model (``nnx.eval_shape``: shapes, no memory) built like this one to run
        on ``parallel``; fill it with a state to place this model's weights there."""
        return nnx.eval_shape(lambda: Kimi(
            self.config, dtype=self.dtype, moe_impl=self.moe_impl, expert_format=self.expert_format,
            vision_attention=self.vision_attention, parallel=parallel,
        ))

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
        ``kimi_jax.media.preprocess.preprocess_media`` returns them) are the media of all
        rows in order; ``input_ids`` then hold one ``<|media_pad|>`` per media token
        (expanded, see the module doc). ``positions`` default to 0..T-1; ``attention_mask``
        [B, T] marks real tokens. Ids are checked by :func:`kimi_jax.model.inputs.check_token_ids`
        (out-of-range ids raise; under ``jit`` they give NaN logits).
        """
        input_ids = check_token_ids(input_ids, self.config.text.vocab_size)
        ids = jnp.asarray(input_ids)
        grids = self._media_grids(input_ids, pixel_values, grid_thws)
        pixels = None if not grids else jnp.asarray(pixel_values)
        return _forward(self, ids, pixels, grids, positions, attention_mask)

    def embed_inputs(self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None,
                     grid_thws: Any = None) -> jax.Array:
        """The decoder's input embeddings [B, T, D]: token embeddings with the media features
        spliced in (arguments as for ``__call__``)."""
        input_ids = check_token_ids(input_ids, self.config.text.vocab_size)
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

        Compiled over the language model's split state, which returns only these: run eagerly,
        a K2.5 cut of 8 layers ran out of memory on an 80 GB GPU (an 18 GiB copy of one
        projection's INT4 expert stack).
        """
        embeds = self.embed_inputs(input_ids, pixel_values=pixel_values, grid_thws=grid_thws)
        self.set_attributes(capture=True, raise_if_not_found=False)
        try:
            graphdef, state = nnx.split(self.language_model)
        finally:
            self.set_attributes(capture=False, raise_if_not_found=False)
        logits, inter = _trace(graphdef, state, embeds, kwargs)
        runs = self.config.text.layer_runs
        named = {}
        for path, value in nnx.to_flat_state(inter):
            keep = [str(p) for p in path if p not in ("language_model", "mlp")]
            value = value.get_value()[0]
            if keep[0] != "runs":
                named[".".join(keep)] = value
                continue
            start = runs[int(keep[1])][0]
            for j, per_layer in enumerate(value):  # stacked over the run's layers by the scan
                named[".".join(["layers", str(start + j), *keep[2:]])] = per_layer
        return logits, named

    def set_moe_impl(self, impl: str) -> None:
        """Switch every MoE layer between the ``grouped`` and ``reference`` expert paths."""
        for run in self.language_model.runs:
            if isinstance(run.mlp, MoE):
                run.mlp.set_impl(impl)
        self.moe_impl = impl


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


@functools.partial(jax.jit, static_argnums=0)
def _trace(graphdef, state, embeds: jax.Array, kwargs: dict) -> tuple[jax.Array, nnx.State]:
    """The language model's logits and captured intermediates (``Kimi.trace``)."""
    return nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(inputs_embeds=embeds, **kwargs)


@nnx.jit(static_argnames="grids")
def _embed(model: Kimi, input_ids: jax.Array, is_media: jax.Array, pixel_values: jax.Array | None,
           grids: tuple[Grid, ...]) -> jax.Array:
    return model.spliced_embeddings(input_ids, is_media, pixel_values, grids)


@nnx.jit(static_argnames="grids")
def _forward(
    model: Kimi, input_ids: jax.Array, pixel_values: jax.Array | None, grids: tuple[Grid, ...],
    positions: jax.Array | None, attention_mask: jax.Array | None,
) -> jax.Array:
    embeds = model.spliced_embeddings(input_ids, input_ids == model._placeholder_id(), pixel_values, grids)
    return model.language_model(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask)
