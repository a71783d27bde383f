"""Optimizers on optax: AdamW, and Muon (``optax.contrib.muon``) for the weight matrices
with AdamW for embeddings, the lm_head and vectors, as Kimi K2 was trained; and MuonClip's
QK-clip, which rescales a head's query and key weights when its attention logits grow past
a threshold.

Muon orthogonalizes matrices; the model's weights are stored with per-head or per-expert
axes, so each is told which axes are its input (reduction) and output axes
(:func:`muon_dimensions`), the others (experts) being independent matrices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, muon

from kimi_jax.model.mla import MLA

OPTIMIZERS = ("adamw", "muon")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """``name`` (``adamw`` or ``muon``), peak ``learning_rate`` after ``warmup_steps`` of linear
    warm-up, cosine decay to ``final_lr_fraction`` of it over ``decay_steps`` (0: constant),
    AdamW's betas and ``weight_decay`` (on matrices only), gradient clipping by global norm
    (``clip_norm``, 0: off)."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    decay_steps: int = 0
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose from {OPTIMIZERS}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        for field in ("warmup_steps", "decay_steps"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")


def _path_names(path) -> tuple[str, ...]:
    """The dict keys and list indices of a pytree path (a Variable's ``.value`` step left out:
    optax sees the parameters as Variables at init and as arrays at update)."""
    return tuple(str(k.key if hasattr(k, "key") else k.idx) for k in path if hasattr(k, "key") or hasattr(k, "idx"))


def muon_dimensions(path, leaf) -> MuonDimensionNumbers | None:
    """Muon's axes for the parameter at ``path``, or None where AdamW is used instead
    (vectors, the embedding, the lm_head)."""
    names = _path_names(path)
    lead = 1 if "runs" in names else 0  # decoder layers' weights are stacked: [layers, ...]
    ndim = len(leaf.shape) - lead
    if ndim < 2 or names[-1] in ("embed_tokens", "lm_head"):
        return None

    def dims(reduction, output):  # axes of one layer's weight, shifted past the layers axis
        def shift(a):
            return a + lead if isinstance(a, int) else tuple(i + lead for i in a)
        return MuonDimensionNumbers(reduction_axis=shift(reduction), output_axis=shift(output))

    if "experts" in names and ndim == 3:  # [E, in, out]
        return dims(1, 2)
    if names[-1] == "o_proj":  # [N, V, D]
        return dims((0, 1), 2)
    if ndim == 3:  # q_proj / q_b_proj / kv_b_proj [in, N, K]
        return dims(0, (1, 2))
    return dims(tuple(range(ndim - 1)), ndim - 1)


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
    if cfg.decay_steps:
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, cfg.warmup_steps, cfg.warmup_steps + cfg.decay_steps,
            end_value=cfg.learning_rate * cfg.final_lr_fraction,
        )
    if cfg.warmup_steps:
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optax transformation ``cfg`` describes."""
    lr = schedule(cfg)

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        opt = muon(
            lr, beta=cfg.b1, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
            adam_b1=cfg.b1, adam_b2=cfg.b2, adam_weight_decay=cfg.weight_decay,
            muon_weight_dimension_numbers=lambda params: jax.tree_util.tree_map_with_path(muon_dimensions, params),
            consistent_rms=0.2,  # Moonlight / K2: Muon updates at AdamW's RMS, so AdamW's learning rate fits
        )
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt


def qk_clip(attn: MLA, max_logits: jax.Array, threshold: float) -> None:
    """MuonClip's QK-clip for one MLA layer, or a run of them (weights and ``max_logits``
    with a leading layers axis): every head whose largest attention logit ``max_logits`` [N] exceeds ``threshold`` gets ``gamma = threshold / max_logit``; its
    query and key nope weights are scaled by ``sqrt(gamma)`` and its query rope weights by
    ``gamma`` (the rope key is shared by all heads and left alone), so its logits shrink by gamma."""
    gamma = jnp.where(max_logits > threshold, threshold / jnp.maximum(max_logits, 1e-30), 1.0)  # [..., N]
    cfg = attn.cfg
    root = jnp.sqrt(gamma)[..., None]
    lead = gamma.shape[:-1]  # the layers of a run, if the weights are stacked
    q_scale = jnp.concatenate([jnp.broadcast_to(root, (*gamma.shape, cfg.qk_nope_head_dim)),
                               jnp.broadcast_to(gamma[..., None], (*gamma.shape, cfg.qk_rope_head_dim))], axis=-1)
    q = attn.q_proj if cfg.q_lora_rank is None else attn.q_b_proj
    q[...] = (q[...] * q_scale[..., None, :, :]).astype(q.dtype)  # [..., in, N, H + R]
    k_scale = jnp.concatenate([jnp.broadcast_to(root, (*gamma.shape, cfg.qk_nope_head_dim)),
                               jnp.ones((*lead, gamma.shape[-1], cfg.v_head_dim))], axis=-1)
    attn.kv_b_proj[...] = (attn.kv_b_proj[...] * k_scale[..., None, :, :]).astype(attn.kv_b_proj.dtype)  # [..., C, N, H + V]
