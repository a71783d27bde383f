"""Losses: next-token cross-entropy over the trained tokens only, and DeepSeek-V3's
sequence-wise balance loss; expert loads for the auxiliary-loss-free bias update.

A batch is a dict of [B, T] arrays: ``inputs`` (token ids), ``targets`` (the next token
at each position), ``weights`` (float32, 1 where the target is trained: assistant tokens;
0 for prompt tokens and padding) and ``valid`` (bool, real tokens; padding is False).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.train.forward import Routing


def next_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of ``logits`` [B, T, V] against ``targets`` [B, T] over the
    positions ``weights`` [B, T] select (weighted mean); returns (loss, number of trained tokens)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    total = weights.sum()
    return (nll * weights).sum() / jnp.maximum(total, 1.0), total


def expert_load(routing: Routing, valid: jax.Array, n_experts: int) -> jax.Array:
    """Tokens sent to each expert [E] (float32) by the real tokens (``valid`` [B, T])."""
    keep = valid.reshape(-1).astype(jnp.float32)
    onehot = jax.nn.one_hot(routing.idx, n_experts, dtype=jnp.float32)  # [BT, K, E]
    return jnp.einsum("tke,t->e", onehot, keep)


def sequence_balance_loss(routing: Routing, valid: jax.Array, top_k: int) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss of one MoE layer (without its factor alpha):
    per sequence ``sum_i f_i P_i`` with ``f_i = E / (K T) * #{t: t chose i}`` and ``P_i`` the
    mean over the sequence of the scores normalized over the experts; averaged over sequences.
    Only real tokens (``valid`` [B, T]) count."""
    B, T = valid.shape
    E = routing.scores.shape[-1]
    keep = valid.astype(jnp.float32)
    n = jnp.maximum(keep.sum(-1), 1.0)  # [B]
    chosen = jax.nn.one_hot(routing.idx, E, dtype=jnp.float32).sum(1).reshape(B, T, E)
    f = E / top_k * jnp.einsum("bte,bt->be", jax.lax.stop_gradient(chosen), keep) / n[:, None]
    probs = routing.scores / routing.scores.sum(-1, keepdims=True)
    p = jnp.einsum("bte,bt->be", probs.reshape(B, T, E), keep) / n[:, None]
    return (f * p).sum(-1).mean()


def bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's auxiliary-loss-free balancing: ``bias + rate * sign(mean load - load)``,
    the mean over the experts (the last axis; leading axes are layers)."""
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)
