"""Multi-head Latent Attention (MLA).

Einsum letters: B batch, T query positions, S key positions, D model, N heads,
Q q-LoRA rank, C kv latent (kv_lora_rank), R rope dim, H nope head dim, V value head dim.

Two mathematically equal forms share the weights:
- ``expanded``: the latent is expanded to per-head keys and values (``kv_b_proj``), then
  ordinary attention. Cheapest when many queries attend over keys computed in the same call.
- ``absorbed``: ``kv_b_proj``'s key half is folded into the query and its value half applied
  after attending over the latent, so keys and values are never expanded. Used with the
  compressed cache, where each step has few queries and many cached keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.config import QK_NORM_EPS, TextConfig
from kimi_jax.layers import apply_rope, rms_norm, weight


class MLA(nnx.Module):
    """MLA with weights in the checkpoint's split: q down/up, kv down (latent + rope key), kv up, out."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = weight(rngs, (D, N, cfg.qk_head_dim), ("embed", "heads", "qk_head"), dtype)
        else:
            Q = cfg.q_lora_rank
            self.q_a_proj = weight(rngs, (D, Q), ("embed", "q_lora"), dtype)
            self.q_a_layernorm = weight(rngs, (Q,), ("norm",), dtype, init="ones")
            self.q_b_proj = weight(rngs, (Q, N, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"), dtype)
        self.kv_a_proj_with_mqa = weight(rngs, (D, C + R), ("embed", "kv_a"), dtype)
        self.kv_a_layernorm = weight(rngs, (C,), ("norm",), dtype, init="ones")
        self.kv_b_proj = weight(
            rngs, (C, N, cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads", "kv_head"), dtype
        )
        self.o_proj = weight(rngs, (N, cfg.v_head_dim, D), ("heads", "v_head", "embed"), dtype)

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-head queries: nope part [B, T, N, H] and roped part [B, T, N, R]."""
        if self.cfg.q_lora_rank is None:
            q = jnp.einsum("btd,dnk->btnk", x, self.q_proj[...])
        else:
            qa = jnp.einsum("btd,dq->btq", x, self.q_a_proj[...])
            qa = rms_norm(qa, self.q_a_layernorm[...], QK_NORM_EPS)
            q = jnp.einsum("btq,qnk->btnk", qa, self.q_b_proj[...])
        H = self.cfg.qk_nope_head_dim
        return q[..., :H], apply_rope(q[..., H:], cos[:, :, None], sin[:, :, None])

    def latents(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What the compressed cache holds: normalized latent [B, S, C] and roped key [B, S, R]."""
        kv = jnp.einsum("bsd,dc->bsc", x, self.kv_a_proj_with_mqa[...])
        C = self.cfg.kv_lora_rank
        c_kv = rms_norm(kv[..., :C], self.kv_a_layernorm[...], QK_NORM_EPS)
        return c_kv, apply_rope(kv[..., C:], cos, sin)

    def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask) -> jax.Array:
        """Attention with per-head keys/values expanded from the latent. Returns [B, T, D]."""
        H = self.cfg.qk_nope_head_dim
        kv = jnp.einsum("bsc,cnk->bsnk", c_kv, self.kv_b_proj[...])
        k_nope, v = kv[..., :H], kv[..., H:]
        scores = jnp.einsum("btnh,bsnh->bnts", q_nope, k_nope, preferred_element_type=jnp.float32)
        scores += jnp.einsum("btnr,bsr->bnts", q_pe, k_pe, preferred_element_type=jnp.float32)
        probs = self._softmax(scores, mask).astype(v.dtype)
        out = jnp.einsum("bnts,bsnv->btnv", probs, v)
        return jnp.einsum("btnv,nvd->btd", out, self.o_proj[...])

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> jax.Array:
        """Attention over the latent itself (keys/values never expanded). Returns [B, T, D]."""
        H = self.cfg.qk_nope_head_dim
        w_k, w_v = self.kv_b_proj[..., :H], self.kv_b_proj[..., H:]
        q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, w_k)
        scores = jnp.einsum("btnc,bsc->bnts", q_lat, c_kv, preferred_element_type=jnp.float32)
        scores += jnp.einsum("btnr,bsr->bnts", q_pe, k_pe, preferred_element_type=jnp.float32)
        probs = self._softmax(scores, mask).astype(c_kv.dtype)
        out_lat = jnp.einsum("bnts,bsc->btnc", probs, c_kv)
        out = jnp.einsum("btnc,cnv->btnv", out_lat, w_v)
        return jnp.einsum("btnv,nvd->btd", out, self.o_proj[...])

    def _softmax(self, scores: jax.Array, mask: jax.Array) -> jax.Array:
        """Scaled, masked softmax in float32; ``mask`` [B, T, S] is True where a key is visible.

        Masked scores get the lowest finite float, so a query that sees no key (padding)
        yields finite values instead of NaN.
        """
        scores = jnp.where(mask[:, None], scores * self.cfg.softmax_scale, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(scores, axis=-1)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """Self-attention over the sequence ``x`` [B, T, D] (no cache)."""
        q_nope, q_pe = self.queries(x, cos, sin)
        c_kv, k_pe = self.latents(x, cos, sin)
        return self.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask)
