"""Parameter counts by component, and the config summary ``kimi-jax info`` prints."""

from __future__ import annotations

import math

import jax.numpy as jnp

from kimi_jax.config import KimiConfig
from kimi_jax.convert import _leaf_paths, abstract_params

COMPONENTS = (
    "embedding", "attention", "dense_mlp", "router", "routed_experts", "shared_experts", "norms", "lm_head",
)


def component_of(path: tuple) -> str:
    """The component a decoder parameter belongs to, from its path in the parameter tree."""
    if path[-1] == "embed_tokens":
        return "embedding"
    if path[-1] == "lm_head":
        return "lm_head"
    if "self_attn" in path:
        return "norms" if "layernorm" in str(path[-1]) else "attention"
    for part in ("experts", "shared_experts"):
        if part in path:
            return "routed_experts" if part == "experts" else "shared_experts"
    if "gate" in path:
        return "router"
    if "mlp" in path:
        return "dense_mlp"
    return "norms"


def parameter_counts(config: KimiConfig) -> dict[str, int]:
    """Decoder parameters by component (from the abstract model: no memory)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for path, leaf in _leaf_paths(abstract_params(config, jnp.bfloat16)["language_model"]):
        counts[component_of(path)] += math.prod(leaf.shape)
    return counts


def active_parameters(config: KimiConfig, counts: dict[str, int]) -> int:
    """Parameters one token passes through: all but the routed experts it is not sent to."""
    t = config.text
    return sum(counts.values()) - counts["routed_experts"] * (1 - t.num_experts_per_tok / t.n_routed_experts)


def describe(config: KimiConfig) -> str:
    """A few lines summarizing the decoder's shape."""
    t = config.text
    rope = "none" if t.rope_scaling is None else (
        f"yarn x{t.rope_scaling.factor:g} from {t.rope_scaling.original_max_position_embeddings}")
    lines = [
        f"model type      {config.model_type}" + (" (with vision tower)" if config.is_multimodal else ""),
        f"decoder         {t.num_hidden_layers} layers ({t.num_dense_layers} dense), hidden {t.hidden_size}, "
        f"vocab {t.vocab_size}",
        f"attention       MLA, {t.num_attention_heads} heads, q_lora {t.q_lora_rank}, kv_lora {t.kv_lora_rank}, "
        f"qk {t.qk_nope_head_dim}+{t.qk_rope_head_dim}, v {t.v_head_dim}",
        f"experts         {t.n_routed_experts} routed (top {t.num_experts_per_tok}, groups {t.n_group}/"
        f"{t.topk_group}), {t.n_shared_experts} shared, hidden {t.moe_intermediate_size}",
        f"context         {t.max_position_embeddings} positions, rope theta {t.rope_theta:g}, {rope}",
    ]
    if config.quantization_config:
        q = config.quantization_config
        lines.append(f"quantization    {q.get('quant_method')} {q.get('format', '')}".rstrip())
    return "\n".join(lines)
