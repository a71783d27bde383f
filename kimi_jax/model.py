"""The Kimi K2 / K2.5 decoder and the top-level model.

Einsum letters: B batch, T positions, D model, V vocabulary.

``Kimi`` mirrors the checkpoint's top level: ``language_model`` now; ``vision_tower`` and
``mm_projector`` join it with the vision model. :meth:`Kimi.trace` runs the model and
returns named per-layer activations and routing decisions alongside the logits.
:meth:`TextModel.extend` is the cached step generation is built on (``kimi_jax.engine``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from kimi_jax.attention import MLA
from kimi_jax.cache import KVCache, LayerCache
from kimi_jax.config import KimiConfig, TextConfig
from kimi_jax.layers import rms_norm, rope_attention_factor, rope_table, weight, yarn_inv_freq
from kimi_jax.moe import MLP, MoE
from kimi_jax.sharding import Layout, constrain, layout_scope


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

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and lm_head; logits in float32."""
        h = rms_norm(hidden, self.norm[...], self.cfg.rms_norm_eps)
        if self.capture:
            self.sow(nnx.Intermediate, "final_norm", h)
        return jnp.einsum("btd,dv->btv", h, self.lm_head[...], preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Full-sequence forward: ``input_ids`` [B, T] -> logits [B, T, V] (float32).

        ``positions`` default to 0..T-1; ``attention_mask`` [B, T] marks real tokens (keys
        where it is 0 are never attended to).
        """
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = jnp.tril(jnp.ones((T, T), bool))[None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        mask = jnp.broadcast_to(mask, (B, T, T))
        cos, sin = self.rope(positions)
        with layout_scope(self.parallel):
            x = constrain(self.embed(input_ids), ACTIVATION_AXES)
            if self.capture:
                self.sow(nnx.Intermediate, "embed", x)
            for layer in self.layers:
                x = constrain(layer(x, cos, sin, mask), ACTIVATION_AXES)
            return self.logits(x)

    def extend(
        self, input_ids: jax.Array, counts: jax.Array, cache: KVCache, *, absorbed: bool, key_block: int
    ) -> tuple[jax.Array, KVCache]:
        """Appends tokens to the cache; logits [B, V] (float32) at each row's last new token.

        Row ``b`` of ``input_ids`` [B, T] holds ``counts[b]`` new tokens followed by padding;
        they take positions ``cache.lengths[b] + 0..T-1`` and each attends to the cache slots
        up to its own position. Padding writes only slots past the row's new length, which
        later tokens overwrite before any query sees them. A row with count 0 keeps its
        length (its logits are meaningless). ``absorbed`` selects MLA's form, ``key_block``
        how many cache slots attention scores at once (``MLA.cached``).
        """
        T = input_ids.shape[1]
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
        cos, sin = self.rope(positions)
        layers = []
        with layout_scope(self.parallel):
            x = constrain(self.embed(input_ids), ACTIVATION_AXES)
            for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
                x, layer_cache = layer.cached(
                    x, cos, sin, positions, layer_cache, absorbed=absorbed, key_block=key_block
                )
                x = constrain(x, ACTIVATION_AXES)
                layers.append(layer_cache)
            last = jnp.take_along_axis(x, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)
            return self.logits(last)[:, 0], KVCache(tuple(layers), cache.lengths + counts)


class Kimi(nnx.Module):
    """Kimi K2 / K2.5: ``model(input_ids)`` [B, T] -> logits [B, T, V].

    ``expert_format`` selects how the routed experts are stored (see ``kimi_jax.moe``).
    """

    def __init__(
        self,
        config: KimiConfig,
        *,
        dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs | None = None,
        moe_impl: str = "grouped",
        expert_format: str = "dense",
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.language_model = TextModel(
            config.text, dtype=self.dtype, rngs=rngs, moe_impl=moe_impl, expert_format=expert_format
        )

    def __call__(self, input_ids: jax.Array, **kwargs) -> jax.Array:
        """Logits [B, T, V] (float32) for ``input_ids`` [B, T]; compiled once per shape."""
        return _forward(self.language_model, jnp.asarray(input_ids), **kwargs)

    def trace(self, input_ids: jax.Array, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits plus named intermediates: per layer ``input_norm``, ``attn_out``, ``mlp_out``
        and, in MoE layers, ``router_scores`` [T, E], ``router_idx`` / ``router_weights`` [T, K],
        keyed like ``"layers.1.router_idx"`` (T = batch x sequence, flattened).
        """
        self.set_attributes(capture=True, raise_if_not_found=False)
        try:
            logits, inter = nnx.capture(self.language_model, nnx.Intermediate)(jnp.asarray(input_ids), **kwargs)
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


@nnx.jit
def _forward(text: TextModel, input_ids: jax.Array, **kwargs) -> jax.Array:
    return text(input_ids, **kwargs)
