"""The Kimi K2 / K2.5 text decoder: embedding, decoder layers (MLA + dense MLP or MoE),
final norm and lm_head.

Einsum letters: B batch, T positions, D model, V vocabulary.

Layers are scanned: the consecutive layers of one kind (the first ``first_k_dense_replace``
dense layers, then the MoE layers; ``TextConfig.layer_runs``) are one :class:`DecoderLayer` whose
weights are stacked on a leading ``layers`` axis, run with ``jax.lax.scan``, so compile time does
not grow with depth. :meth:`TextModel.layer` gives one layer as its own module, and :func:`per_layer` turns a
state into the checkpoint's one-entry-per-layer form (``layers.3...``).

:meth:`TextModel.extend` is the cached step generation is built on
(``kimi_jax.inference.steps``). With a :class:`~kimi_jax.parallel.Parallel` the hidden
states are pinned to the layout between layers and the MoE layers run expert-parallel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.config.model import TextConfig
from kimi_jax.model.cache import KVCache, LayerCache
from kimi_jax.model.layers import (
    Quantized,
    rms_norm,
    rope_attention_factor,
    rope_table,
    weight,
    yarn_inv_freq,
)
from kimi_jax.model.mla import MLA
from kimi_jax.model.moe import MLP, MoE
from kimi_jax.parallel.placement import Parallel, constrain

ACTIVATION_AXES = ("batch", None, None)
"""Logical axes of the hidden states [B, T, D] between layers."""
STACKED = {nnx.PARTITION_NAME: "layers", "axes": "layers"}
"""How ``nnx.vmap`` (building a run) and ``nnx.spmd.remove_axis`` (a layer of it) add or remove the
leading ``layers`` axis in the weights' metadata."""



IN_PLACE_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                        "up_proj", "down_proj", "gate/weight", "kv_a_layernorm", "gate/e_score_correction_bias")
"""The weights a cached step reads from a run's stack in place: attention's, the dense MLPs',
the shared experts' and the router's projections (``gate/weight``: a path's last names), and
the small weights that kernels take beside them (the latent's norm, the router's bias: a
layer sliced out of a stack for a kernel is a copy, one more launch)."""


def in_place_weight(path: tuple, value) -> bool:
    """An ``nnx`` filter: the weights of :data:`IN_PLACE_PROJECTIONS` outside the routed experts."""
    names = tuple(str(p) for p in path)
    named = names[-1] in IN_PLACE_PROJECTIONS or "/".join(names[-2:]) in IN_PLACE_PROJECTIONS
    return named and "experts" not in names


def per_layer(cfg: TextConfig, tree: dict) -> dict:
    """A text model's state (a pure dict of arrays or ``ShapeDtypeStruct``s) with ``runs``
    replaced by ``layers``: one entry per decoder layer, as checkpoints store them."""
    out = {k: v for k, v in tree.items() if k != "runs"}
    out["layers"] = {
        start + j: jax.tree.map(lambda a, j=j: _index(a, j), tree["runs"][r])
        for r, (start, count) in enumerate(cfg.layer_runs)
        for j in range(count)
    }
    return out


def _index(a, j: int):
    """Entry ``j`` of a stacked array, or the ``ShapeDtypeStruct`` (and sharding) of one."""
    if not isinstance(a, jax.ShapeDtypeStruct):
        return a[j]
    sharding = a.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sharding)


class DecoderLayer(nnx.Module):
    """``h = x + attn(norm(x)); out = h + mlp(norm(h))``; the MLP is dense or MoE."""

    def __init__(
        self, cfg: TextConfig, index: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, moe_impl: str, expert_format: str,
        parallel: Parallel | None,
    ):
        self.eps = cfg.rms_norm_eps
        self.capture = False
        D = cfg.hidden_size
        self.input_layernorm = weight(rngs, (D,), ("norm",), dtype, init="ones")
        self.self_attn = MLA(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = weight(rngs, (D,), ("norm",), dtype, init="ones")
        if cfg.is_moe_layer(index):
            self.mlp = MoE(cfg, dtype=dtype, rngs=rngs, impl=moe_impl, expert_format=expert_format, parallel=parallel)
        else:
            self.mlp = MLP(D, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 layer: jax.Array | None = None) -> jax.Array:
        """``layer``: this layer's index in its run (for an MoE's stacked INT4 experts)."""
        normed = rms_norm(x, self.input_layernorm[...], self.eps)
        return self._residual(x, normed, self.self_attn(normed, cos, sin, mask), layer=layer)

    def cached(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array, cache: LayerCache, layer: jax.Array,
        *, absorbed: bool, key_block: int, valid: jax.Array | None = None, rows: jax.Array | None = None,
        seen: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache]:
        """The layer over new tokens at ``positions``, attending over (and writing) layer
        ``layer`` of its run's ``cache`` (sequences ``rows``, see ``MLA.cached``); ``valid`` [B, T]
        marks the real tokens (only those attend and are routed to experts); ``seen``: see ``MLA.cached``."""
        normed = rms_norm(x, self.input_layernorm[...], self.eps)
        attn, cache = self.self_attn.cached(normed, cos, sin, positions, cache, layer, absorbed=absorbed,
                                            key_block=key_block, valid=valid, rows=rows, seen=seen)
        return self._residual(x, normed, attn, valid, layer), cache

    def _residual(self, x: jax.Array, normed: jax.Array, attn: jax.Array, valid: jax.Array | None = None,
                  layer: jax.Array | None = None) -> jax.Array:
        h = x + attn
        y = rms_norm(h, self.post_attention_layernorm[...], self.eps)
        mlp = self.mlp(y, valid, layer) if isinstance(self.mlp, MoE) else self.mlp(y, layer)
        if self.capture:
            self.sow(nnx.Intermediate, "input_norm", normed)
            self.sow(nnx.Intermediate, "attn_out", attn)
            self.sow(nnx.Intermediate, "mlp_out", mlp)
        return h + mlp


class TextModel(nnx.Module):
    """Embedding, decoder layers (``runs``: one stacked :class:`DecoderLayer` per
    ``cfg.layer_runs`` entry), final norm and the (untied) lm_head."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        moe_impl: str = "grouped",
        expert_format: str = "dense",
        parallel: Parallel | None = None,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.capture = False
        self.parallel = parallel
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = weight(rngs, (V, D), ("vocab", "embed"), dtype)

        def run(start: int, count: int) -> DecoderLayer:
            @nnx.split_rngs(splits=count)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=STACKED)
            def build(rngs):
                return DecoderLayer(cfg, start, dtype=dtype, rngs=rngs, moe_impl=moe_impl, expert_format=expert_format,
                                    parallel=parallel)
            return build(rngs)

        self.runs = nnx.List([run(start, count) for start, count in cfg.layer_runs])
        self.norm = weight(rngs, (D,), ("norm",), dtype, init="ones")
        self.lm_head = weight(rngs, (D, V), ("embed", "vocab"), dtype)

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` as a module of its own (its weights sliced out of the run: a
        copy, for inspection; changing it leaves the model alone)."""
        for (start, count), run in zip(self.cfg.layer_runs, self.runs, strict=True):
            if start <= i < start + count:
                graphdef, state = nnx.split(run)
                state = nnx.spmd.remove_axis(jax.tree.map(lambda a: _index(a, i - start), state), 0, STACKED)
                return nnx.merge(graphdef, state)
        raise IndexError(f"layer {i} out of range: the model has {self.cfg.num_hidden_layers} layers")

    def _scan(self, run: DecoderLayer, fn: Callable, carry, *, remat: bool = False, in_place: bool = False):
        """``fn(layer, carry, i) -> (carry, y)`` over the layers of ``run`` (``i``: the layer's
        index in its run); returns the carry and the ys stacked [L, ...].

        A ``jax.lax.scan`` over the run's split state (each step merges its layer), so the
        model may come from any trace (e.g. merged inside ``jax.grad``). INT4 experts enter
        whole: slicing a layer out would copy it on GPUs (a dynamic slice feeding a kernel is
        materialized), so the MoE reads its layer of the stack in place. With ``in_place`` (the
        cached steps), so do the big projections (:func:`in_place_weight`), which
        ``kimi_jax.model.layers.project`` reads by ``i``. Intermediates the
        layers sow (``capture``) come out stacked over the run's layers, sown on ``run``.
        """
        whole_filter = nnx.Any(Quantized, in_place_weight) if in_place else Quantized
        graphdef, sliced, whole = nnx.split(run, nnx.Not(whole_filter), whole_filter)
        count = jax.tree.leaves(sliced)[0].shape[0]

        def step(carry, inputs):
            state, i = inputs
            layer = nnx.merge(graphdef, nnx.spmd.remove_axis(state, 0, STACKED), whole)
            if not self.capture:
                carry, y = fn(layer, carry, i)
                return carry, (y, None)
            (carry, y), sown = nnx.capture(lambda layer: fn(layer, carry, i), nnx.Intermediate)(layer)
            return carry, (y, sown)

        carry, (ys, sown) = jax.lax.scan(jax.checkpoint(step) if remat else step, carry,
                                         (sliced, jnp.arange(count, dtype=jnp.int32)))
        if sown is not None:
            for path, var in nnx.to_flat_state(sown):  # e.g. ("mlp", "router_idx"): sown again on the run
                module = functools.reduce(getattr, path[:-1], run)
                module.sow(nnx.Intermediate, path[-1], var.get_value()[0])
        return carry, ys

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
        return constrain(x, ACTIVATION_AXES, self.parallel)

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
        x = self._inputs(input_ids, inputs_embeds)
        if self.capture:
            self.sow(nnx.Intermediate, "embed", x)
        for run in self.runs:
            x, _ = self._scan(run, lambda layer, x, i: (constrain(layer(x, cos, sin, mask, i), ACTIVATION_AXES,
                                                                   self.parallel), None), x)
        return self.logits(x)

    def extend(
        self, input_ids: jax.Array | None, counts: jax.Array, cache: KVCache, *, absorbed: bool, key_block: int,
        inputs_embeds: jax.Array | None = None, rows: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Appends tokens to the cache's sequences ``rows`` [B] (distinct; None: all, in order);
        logits [B, V] (float32) at each row's last new token.

        The tokens come as ``input_ids`` [B, T] or as their embeddings ``inputs_embeds``
        [B, T, D] (a prefill with media spliced in). Row ``b`` holds ``counts[b]`` new tokens
        followed by padding; they take positions ``cache.lengths[r] + 0..T-1`` (r = ``rows[b]``)
        and each attends to the cache slots up to its own position. The cache is updated in
        place: other sequences are neither read nor copied. Padding writes only slots past the
        row's new length, which later tokens overwrite before any query sees them. A row with
        count 0 keeps its length (its logits are meaningless). Padding and rows with count 0
        attend to nothing and are routed to no expert (their cache and experts are not read).
        ``absorbed`` selects MLA's form, ``key_block`` how many cache slots attention scores at
        once (``MLA.cached``).
        """
        T = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        lengths = cache.lengths if rows is None else cache.lengths[rows]
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
        cos, sin = self.rope(positions)
        valid = jnp.arange(T) < counts[:, None]
        seen = jnp.where(valid, positions, -1)  # the slots each query attends up to, once for all layers
        x = self._inputs(input_ids, inputs_embeds)

        def step(layer, carry, i):
            x, run_cache = carry
            x, run_cache = layer.cached(x, cos, sin, positions, run_cache, i, absorbed=absorbed, key_block=key_block,
                                        valid=valid, rows=rows, seen=seen)
            return (constrain(x, ACTIVATION_AXES, self.parallel), run_cache), None

        # One device: read the big projections in place. Split over a mesh, a kernel would see
        # whole arrays (XLA gathers a custom call's operands), so the layers are sliced instead.
        in_place = self.parallel is None or self.parallel.mesh.size == 1
        runs = []
        for run, run_cache in zip(self.runs, cache.runs, strict=True):
            (x, run_cache), _ = self._scan(run, step, (x, run_cache), in_place=in_place)
            runs.append(run_cache)
        last = jnp.take_along_axis(x, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)
        lengths = cache.lengths + counts if rows is None else cache.lengths.at[rows].add(counts)
        return self.logits(last)[:, 0], KVCache(tuple(runs), lengths)
