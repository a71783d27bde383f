"""Multi-head Latent Attention (MLA).

Einsum letters: B batch, T query positions, S key positions, D model, N heads,
Q q-LoRA rank, C kv latent (kv_lora_rank), R rope dim, H nope head dim, V value head dim,
K a whole per-head query (H + R) or key-and-value (H + V) row of a projection.

Two mathematically equal forms share the weights:
- ``expanded``: the latent is expanded to per-head keys and values (``kv_b_proj``), then
  ordinary attention. Cheapest when many queries attend over keys computed in the same call.
- ``absorbed``: ``kv_b_proj``'s key half is folded into the query and its value half applied
  after attending over the latent, so keys and values are never expanded. Used with the
  compressed cache, where each step has few queries and many cached keys.

:meth:`MLA.cached` writes a step's latents into the compressed cache (``kimi_jax.model.cache``)
and attends over the cache in either form (absorbed on NVIDIA GPUs: the split-K Pallas
kernel of ``kimi_jax.kernels.mla_decode``), in key blocks for long caches;
:func:`absorbed_is_cheaper` picks the form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.config.model import QK_NORM_EPS, TextConfig
from kimi_jax.kernels.cache_write import cache_write
from kimi_jax.kernels.cache_write import fits as cache_write_fits
from kimi_jax.kernels.mla_decode import fits as mla_decode_fits
from kimi_jax.kernels.mla_decode import mla_decode
from kimi_jax.kernels.stacked_heads import fits as stacked_heads_fits
from kimi_jax.kernels.stacked_heads import stacked_heads_matmul
from kimi_jax.model.cache import LayerCache
from kimi_jax.model.layers import apply_rope, in_place_or_sliced, layer_of, project, projections, rms_norm, weight


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

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Per-head queries: nope part [B, T, N, H] and roped part [B, T, N, R] (``layer``: see
        :func:`~kimi_jax.model.layers.project`)."""
        if self.cfg.q_lora_rank is None:
            q = project("btd,dnk->btnk", x, self.q_proj[...], layer)
            H = self.cfg.qk_nope_head_dim
            return q[..., :H], apply_rope(q[..., H:], cos[:, :, None], sin[:, :, None])
        return self._queries_from(project("btd,dq->btq", x, self.q_a_proj[...], layer), cos, sin, layer)

    def _queries_from(self, qa: jax.Array, cos: jax.Array, sin: jax.Array,
                      layer: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """:meth:`queries` from the q-LoRA down projection ``qa`` [B, T, Q]."""
        qa = rms_norm(qa, self.q_a_layernorm[...], QK_NORM_EPS)
        q = project("btq,qnk->btnk", qa, self.q_b_proj[...], layer)
        H = self.cfg.qk_nope_head_dim
        return q[..., :H], apply_rope(q[..., H:], cos[:, :, None], sin[:, :, None])

    def latents(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """What the compressed cache holds: normalized latent [B, S, C] and roped key [B, S, R]
        (``layer``: see :func:`~kimi_jax.model.layers.project`)."""
        return self._latents_from(project("bsd,dc->bsc", x, self.kv_a_proj_with_mqa[...], layer), cos, sin)

    def _latents_from(self, kv: jax.Array, cos: jax.Array, sin: jax.Array,
                      layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """:meth:`latents` from the kv down projection ``kv`` [B, S, C + R] (``layer``: of the
        norm's weight when it comes as a run's stack, as in a cached step)."""
        C = self.cfg.kv_lora_rank
        scale = self.kv_a_layernorm[...]
        c_kv = rms_norm(kv[..., :C], scale if scale.ndim == 1 else layer_of(scale, layer), QK_NORM_EPS)
        return c_kv, apply_rope(kv[..., C:], cos, sin)

    def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask, layer=None) -> jax.Array:
        """Attention with per-head keys/values expanded from the latent. Returns [B, T, D]."""
        return self._attend(q_nope, q_pe, c_kv, k_pe, mask, absorbed=False, layer=layer)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, layer=None) -> jax.Array:
        """Attention over the latent itself (keys/values never expanded). Returns [B, T, D]."""
        return self._attend(self._absorb(q_nope, layer), q_pe, c_kv, k_pe, mask, absorbed=True, layer=layer)

    def attend_cache(
        self, q_nope: jax.Array, q_pe: jax.Array, cache: LayerCache, layer: jax.Array, positions: jax.Array, *,
        absorbed: bool, block: int, rows: jax.Array | None = None,
    ) -> jax.Array:
        """Attention of queries at ``positions`` [B, T] over layer ``layer``'s cache slots up to
        their positions (of cache sequences ``rows`` [B]; None: the first B).

        The slots are visited in blocks of ``block`` with an online softmax, so the scores
        take [B, N, T, block] rather than [B, N, T, S], and blocks past the furthest query
        position are not visited at all. A query that sees no slot gets zeros. Returns [B, T, D].
        """
        q = self._absorb(q_nope, layer) if absorbed else q_nope
        (B, T, N, _), S, dtype = q.shape, cache.c_kv.shape[2], q_pe.dtype
        width = self.cfg.kv_lora_rank if absorbed else self.cfg.v_head_dim
        lowest = jnp.finfo(jnp.float32).min

        def visit(i, carry):
            m, total, acc = carry
            start = jnp.minimum(i * block, S - block)  # the last block is shifted back to fit
            c_kv, k_pe = (a.astype(dtype) for a in cache.layer(layer, rows, start, block))
            scores, values = self._scores_and_values(q, q_pe, c_kv, k_pe, absorbed, layer)
            slots = start + jnp.arange(block)
            # slots a shifted block shares with the previous one were counted already
            visible = ((slots >= i * block) & (slots <= positions[..., None]))[:, None]
            scores = jnp.where(visible, scores * self.cfg.softmax_scale, lowest)
            m_new = jnp.maximum(m, scores.max(-1))
            probs = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
            rescale = jnp.exp(m - m_new)
            total = total * rescale + probs.sum(-1)
            acc = acc * rescale.transpose(0, 2, 1)[..., None] + self._weigh(probs, values, absorbed)
            return m_new, total, acc

        init = (jnp.full((B, N, T), lowest), jnp.zeros((B, N, T)), jnp.zeros((B, T, N, width)))
        n_blocks = jnp.minimum(jnp.max(positions) // block + 1, -(-S // block))
        _, total, acc = jax.lax.fori_loop(0, n_blocks, visit, init)
        total = total.transpose(0, 2, 1)[..., None]
        out = jnp.where(total > 0, acc / jnp.where(total > 0, total, 1.0), 0.0).astype(dtype)
        return self._project(out, absorbed, layer)

    def _absorb(self, q_nope: jax.Array, layer: jax.Array | None = None, *, interpret: bool = False) -> jax.Array:
        """``q_nope`` [B, T, N, H] folded through ``kv_b_proj``'s key half: [B, T, N, C]."""
        return self._through_kv_b(q_nope, layer, key=True, interpret=interpret)

    def _through_kv_b(self, x: jax.Array, layer: jax.Array | None, *, key: bool, interpret: bool = False) -> jax.Array:
        """``x`` through ``kv_b_proj``'s key half (``btnh,cnh->btnc``) or value half
        (``btnc,cnv->btnv``), head by head.

        ``kv_b_proj`` may be a run's whole stack [L, C, N, H + V] (a cached step on one device):
        layer ``layer`` of it is read in place on NVIDIA GPUs by ``kimi_jax.kernels.stacked_heads``
        where it takes the shapes (XLA would rewrite the whole stack each step to put the heads
        first), sliced out elsewhere. ``interpret``: the kernel in Pallas' interpreter (tests).
        """
        H, V = self.cfg.qk_nope_head_dim, self.cfg.v_head_dim
        start, width = (0, H) if key else (H, V)
        spec = "btnh,cnh->btnc" if key else "btnc,cnv->btnv"
        w = self.kv_b_proj[...]
        if w.ndim == 3:
            return jnp.einsum(spec, x, w[..., start:start + width])

        def sliced(x, w, layer):
            return jnp.einsum(spec, x, layer_of(w, layer)[..., start:start + width])

        (B, T), (_, C, _, W) = x.shape[:2], w.shape

        def in_place(x, w, layer):
            y = stacked_heads_matmul(x.reshape(B * T, *x.shape[2:]), w, layer, start=start, width=width, fold=key,
                                     interpret=interpret)
            return y.reshape(B, T, *y.shape[1:])

        fits = stacked_heads_fits(B * T, C, W, start, width) and x.dtype == w.dtype
        return in_place_or_sliced(x, w, layer, sliced, in_place, fits=fits, interpret=interpret)

    def _attend(self, q, q_pe, c_kv, k_pe, mask, *, absorbed: bool, layer=None) -> jax.Array:
        scores, values = self._scores_and_values(q, q_pe, c_kv, k_pe, absorbed, layer)
        probs = self._softmax(scores, mask)
        return self._project(self._weigh(probs, values, absorbed).astype(c_kv.dtype), absorbed, layer)

    def _scores_and_values(self, q, q_pe, c_kv, k_pe, absorbed: bool, layer=None) -> tuple[jax.Array, jax.Array]:
        """Unscaled scores [B, N, T, S] (float32) and the values.

        Absorbed (``q`` from :meth:`_absorb`): the values are the latents ``c_kv`` [B, S, C].
        Expanded (``q`` is ``q_nope``): keys and values [B, S, N, V] are expanded from them
        (by layer ``layer`` of ``kv_b_proj`` when that is a run's stack).
        """
        if absorbed:
            scores = jnp.einsum("btnc,bsc->bnts", q, c_kv, preferred_element_type=jnp.float32)
            values = c_kv
        else:
            H = self.cfg.qk_nope_head_dim
            w = self.kv_b_proj[...]
            kv = jnp.einsum("bsc,cnk->bsnk", c_kv, w if w.ndim == 3 else layer_of(w, layer))
            scores = jnp.einsum("btnh,bsnh->bnts", q, kv[..., :H], preferred_element_type=jnp.float32)
            values = kv[..., H:]
        scores += jnp.einsum("btnr,bsr->bnts", q_pe, k_pe, preferred_element_type=jnp.float32)
        return scores, values

    def _weigh(self, probs: jax.Array, values: jax.Array, absorbed: bool) -> jax.Array:
        """``probs`` [B, N, T, S] times the values: [B, T, N, C] (absorbed) or [B, T, N, V], float32."""
        probs = probs.astype(values.dtype)
        if absorbed:
            # "bnts,bsc->btnc" in one dot has no bf16 x bf16 -> f32 kernel on XLA:CPU; transpose after.
            out = jnp.einsum("bnts,bsc->bntc", probs, values, preferred_element_type=jnp.float32)
            return out.transpose(0, 2, 1, 3)
        return jnp.einsum("bnts,bsnv->btnv", probs, values, preferred_element_type=jnp.float32)

    def _project(self, out: jax.Array, absorbed: bool, layer: jax.Array | None = None, *,
                 interpret: bool = False) -> jax.Array:
        """Per-head outputs to the model: through ``kv_b_proj``'s value half if absorbed, then
        ``o_proj`` (``layer``: see :func:`~kimi_jax.model.layers.project`)."""
        if absorbed:
            out = self._through_kv_b(out, layer, key=False, interpret=interpret)
        return project("btnv,nvd->btd", out, self.o_proj[...], layer, interpret=interpret)

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

    def cached(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array, cache: LayerCache,
        layer: jax.Array, *, absorbed: bool, key_block: int, valid: jax.Array | None = None,
        rows: jax.Array | None = None, seen: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache]:
        """Attention of new tokens ``x`` [B, T, D] at ``positions`` [B, T] over layer ``layer``
        of its run's cache, whose sequences ``rows`` [B] (distinct; None: the first B) they
        extend, in place.

        The tokens' latents are written into the cache first; then each query attends to the
        slots up to its position (where ``valid`` [B, T] is False, to none: padding reads no
        cache, and its output is meaningless; ``seen``, that is ``where(valid, positions, -1)``,
        may come computed once for all layers): absorbed on NVIDIA GPUs by the Pallas kernel
        (:meth:`attend_cache_pallas`, where it takes the widths), elsewhere (and expanded) with XLA, all at once when the
        cache has at most ``key_block`` slots, else block by block (:meth:`attend_cache`).
        Returns [B, T, D] and the updated cache.
        """
        if self.cfg.q_lora_rank is None:
            q_nope, q_pe = self.queries(x, cos, sin, layer)
            kv = project("bsd,dc->bsc", x, self.kv_a_proj_with_mqa[...], layer)
        else:  # both down projections of x at once (one launch when read in place)
            qa, kv = projections(x, (self.q_a_proj[...], self.kv_a_proj_with_mqa[...]), layer)
            q_nope, q_pe = self._queries_from(qa, cos, sin, layer)
        cache = self.write_cache(cache, layer, positions, kv, cos, sin, rows=rows)
        if seen is not None:
            positions = seen
        elif valid is not None:
            positions = jnp.where(valid, positions, -1)
        attend = functools.partial(self._attend_cache_xla, absorbed=absorbed, key_block=key_block)
        if absorbed and mla_decode_fits(self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim):  # NVIDIA GPUs: Pallas
            out = jax.lax.platform_dependent(q_nope, q_pe, cache, layer, positions, rows,
                                             cuda=self.attend_cache_pallas, default=attend)
            return out, cache
        return attend(q_nope, q_pe, cache, layer, positions, rows), cache

    def write_cache(self, cache: LayerCache, layer: jax.Array, positions: jax.Array, kv: jax.Array, cos: jax.Array,
                    sin: jax.Array, rows: jax.Array | None = None) -> LayerCache:
        """``cache.write(layer, positions, *self._latents_from(kv, cos, sin, layer), rows=rows)``: the
        latents of the kv down projection ``kv`` [n, T, C + R] stored. On NVIDIA GPUs, when the
        step reads the projections in place (one device: a kernel would see a mesh's whole
        arrays), by ``kimi_jax.kernels.cache_write``, which also normalizes and rotates (one
        launch where XLA takes eight)."""
        C, R = self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim

        def xla(cache, layer, positions, kv, cos, sin, rows):
            return cache.write(layer, positions, *self._latents_from(kv, cos, sin, layer), rows=rows)

        if self.o_proj[...].ndim == 3 or not cache_write_fits(C, R):
            return xla(cache, layer, positions, kv, cos, sin, rows)

        def kernel(cache, layer, positions, kv, cos, sin, rows):
            rows = jnp.arange(positions.shape[0], dtype=jnp.int32) if rows is None else rows
            return LayerCache(*cache_write(cache.c_kv, cache.k_pe, layer, rows, positions, kv,
                                           norm=(self.kv_a_layernorm[...], QK_NORM_EPS), rope=(cos, sin)))

        return jax.lax.platform_dependent(cache, layer, positions, kv, cos, sin, rows, cuda=kernel, default=xla)

    def attend_cache_pallas(
        self, q_nope: jax.Array, q_pe: jax.Array, cache: LayerCache, layer: jax.Array, positions: jax.Array,
        rows: jax.Array | None = None, *, interpret: bool = False,
    ) -> jax.Array:
        """Absorbed attention over layer ``layer``'s cache (sequences ``rows``) by
        ``kimi_jax.kernels.mla_decode`` (each visible slot read once, straight from the stacked cache): [B, T, D]."""
        out = mla_decode(self._absorb(q_nope, layer, interpret=interpret), q_pe, cache.c_kv, cache.k_pe, layer,
                         positions, rows=rows, scale=self.cfg.softmax_scale, out_dtype=q_pe.dtype, interpret=interpret)
        return self._project(out, True, layer, interpret=interpret)

    def _attend_cache_xla(self, q_nope, q_pe, cache: LayerCache, layer, positions, rows=None, *, absorbed: bool,
                          key_block: int) -> jax.Array:
        S = cache.c_kv.shape[2]
        if key_block < S:
            return self.attend_cache(q_nope, q_pe, cache, layer, positions, absorbed=absorbed, block=key_block,
                                     rows=rows)
        mask = jnp.arange(S) <= positions[..., None]
        attend = self.attend_absorbed if absorbed else self.attend_expanded
        c_kv, k_pe = cache.layer(layer, rows)
        return attend(q_nope, q_pe, c_kv.astype(q_pe.dtype), k_pe.astype(q_pe.dtype), mask, layer)


def absorbed_is_cheaper(cfg: TextConfig, num_queries: int) -> bool:
    """Whether attending ``num_queries`` tokens over a long cache costs fewer flops absorbed.

    Per key and head, absorbed costs ``num_queries * (2C + R)`` (scores and values over the
    latent); expanded costs ``C * (H + V)`` to expand the key once plus ``num_queries *
    (H + R + V)``. For K2.5 absorbed wins below about 170 queries (decode, short chunks).
    """
    C, R, H, V = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    return num_queries * (2 * C + R) < C * (H + V) + num_queries * (H + R + V)
