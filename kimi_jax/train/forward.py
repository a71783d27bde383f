"""The training forward pass: the decoder's math with router statistics, optional
gradient checkpointing and the attention logits MuonClip needs.

Einsum letters: B batch, T query positions, S key positions, N heads, H nope head dim,
R rope dim, E experts.

It scans the runs of layers of :class:`~kimi_jax.model.decoder.TextModel` exactly as its
``__call__`` does (``tests/train`` checks the logits are equal) and returns, per run of MoE
layers, what the routers chose (stacked over the run's layers), so the balance loss and the
bias update need no captured intermediates. With ``remat`` each decoder layer is recomputed
in the backward pass (``nnx.remat``) instead of keeping its activations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kimi_jax.model.decoder import ACTIVATION_AXES, DecoderLayer, TextModel
from kimi_jax.model.layers import rms_norm
from kimi_jax.model.mla import MLA
from kimi_jax.model.moe import MoE
from kimi_jax.parallel.placement import constrain


class Routing(NamedTuple):
    """MoE routing over the flattened tokens [B*T]: chosen experts [..., B*T, K] and the
    sigmoid scores [..., B*T, E] (float32; they carry the router's gradient). The leading
    axis, where there is one, is the layers of a run."""

    idx: jax.Array
    scores: jax.Array


class Forward(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    routing: tuple[Routing, ...]  # one per run of MoE layers, stacked over its layers [L, ...]
    max_logits: tuple[jax.Array, ...]  # one [L, N] per run: the largest scaled attention logit per head (or empty)


def max_attention_logits(attn: MLA, normed: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    """The largest scaled pre-softmax attention logit of each head over the visible keys: [N]."""
    q_nope, q_pe = attn.queries(normed, cos, sin)
    c_kv, k_pe = attn.latents(normed, cos, sin)
    k_nope = jnp.einsum("bsc,cnh->bsnh", c_kv, attn.kv_b_proj[..., : attn.cfg.qk_nope_head_dim])
    scores = jnp.einsum("btnh,bsnh->bnts", q_nope, k_nope, preferred_element_type=jnp.float32)
    scores += jnp.einsum("btnr,bsr->bnts", q_pe, k_pe, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None], scores * attn.cfg.softmax_scale, -jnp.inf)
    return scores.max(axis=(0, 2, 3))


def _layer(layer: DecoderLayer, x, cos, sin, mask, with_max_logits: bool, index):
    """``DecoderLayer.__call__`` plus the layer's routing (MoE) and max attention logits."""
    normed = rms_norm(x, layer.input_layernorm[...], layer.eps)
    h = x + layer.self_attn(normed, cos, sin, mask)
    inner = rms_norm(h, layer.post_attention_layernorm[...], layer.eps)
    routing = None
    if isinstance(layer.mlp, MoE):
        _, idx, scores = layer.mlp.gate(inner.reshape(-1, inner.shape[-1]))
        routing = Routing(idx, scores)
    logits = (
        jax.lax.stop_gradient(max_attention_logits(layer.self_attn, normed, cos, sin, mask)) if with_max_logits else None
    )
    return h + (layer.mlp(inner, None, index) if isinstance(layer.mlp, MoE) else layer.mlp(inner)), routing, logits


def forward(lm: TextModel, input_ids: jax.Array, *, remat: bool = False, max_logits: bool = False) -> Forward:
    """Logits [B, T, V] of ``input_ids`` [B, T] at positions 0..T-1 with a causal mask, the
    routing of every MoE layer and (``max_logits``) each layer's max attention logit per head."""
    B, T = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None], (B, T, T))
    cos, sin = lm.rope(positions)
    x = constrain(lm.embed(input_ids), ACTIVATION_AXES, lm.parallel)

    def body(layer, x, i):
        x, routing, logits = _layer(layer, x, cos, sin, mask, max_logits, i)
        return constrain(x, ACTIVATION_AXES, lm.parallel), (routing, logits)

    routing, logits = [], []
    for run in lm.runs:
        x, (r, m) = lm._scan(run, body, x, remat=remat)
        if r is not None:
            routing.append(r)
        if m is not None:
            logits.append(m)
    return Forward(lm.logits(x), tuple(routing), tuple(logits))
