"""Parameter counts and on-device bytes by component, and the config summary ``kimi-jax info`` prints."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kimi_jax.config.model import KimiConfig

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


VISION = "vision"
"""The component of the vision tower's and the projector's parameters (not part of the decoder)."""


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter array of the model as the device holds it: its component (one of
    :data:`COMPONENTS` or :data:`VISION`), shape, logical axes and bits per value."""

    component: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    bits: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.bits // 8


_WEIGHTS: dict[tuple[str, str, str], tuple[Weight, ...]] = {}


def model_weights(config: KimiConfig, dtype=jnp.bfloat16, expert_format: str = "dense") -> tuple[Weight, ...]:
    """Every parameter array of the model (decoder, and the vision tower and projector if it
    has them), from the abstract model: no memory. Remembered per config, dtype and format."""
    from flax import nnx

    from kimi_jax.model.kimi import Kimi

    key = (config.to_json(), jnp.dtype(dtype).name, expert_format)
    if key not in _WEIGHTS:
        model = nnx.eval_shape(lambda: Kimi(config, dtype=dtype, rngs=nnx.Rngs(0), expert_format=expert_format))
        _WEIGHTS[key] = tuple(
            Weight(component_of(path[1:]) if path[0] == "language_model" else VISION, tuple(var.shape),
                   tuple(var.get_metadata()["axes"]), jax.dtypes.itemsize_bits(var.dtype))
            for path, var in nnx.to_flat_state(nnx.state(model))
        )
    return _WEIGHTS[key]


def parameter_counts(config: KimiConfig) -> dict[str, int]:
    """Decoder parameters by component (from the abstract model: no memory)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for w in model_weights(config):
        if w.component != VISION:
            counts[w.component] += math.prod(w.shape)
    return counts


def device_bytes(config: KimiConfig, dtype=jnp.bfloat16, expert_format: str = "dense") -> dict[str, int]:
    """Decoder bytes on the device by component, for parameters in ``dtype`` and routed experts
    in ``expert_format`` (``int4``: half a byte per value plus the bfloat16 scales)."""
    sizes = dict.fromkeys(COMPONENTS, 0)
    for w in model_weights(config, dtype, expert_format):
        if w.component != VISION:
            sizes[w.component] += w.nbytes
    return sizes


def sharded_bytes(weights: tuple[Weight, ...], layout) -> dict[str, int]:
    """Bytes one device holds of each component under a mesh layout (each array's shard: its
    bytes over the ways the layout splits it; a layout that cannot split an array evenly is a
    :class:`~kimi_jax.parallel.layout.LayoutError`)."""
    sizes = dict.fromkeys((*COMPONENTS, VISION), 0)
    for w in weights:
        spec = layout.spec(w.axes, w.shape)
        ways = math.prod(
            math.prod(layout.axis_size(m) for m in ((p,) if isinstance(p, str) else p)) for p in spec if p is not None
        )
        sizes[w.component] += w.nbytes // ways
    return sizes


def bytes_per_device(config: KimiConfig, layout, dtype=jnp.bfloat16, expert_format: str = "dense") -> dict[str, int]:
    """Parameter bytes one device holds of each component under a mesh layout (``vision``: the
    vision tower and projector, zero for a text-only model)."""
    return sharded_bytes(model_weights(config, dtype, expert_format), layout)


def bits_per_expert_parameter(config: KimiConfig, dtype=jnp.bfloat16, expert_format: str = "dense") -> float:
    """Device bits per routed-expert weight: 16 for bfloat16, 4 + 16 / 32 = 4.5 for ``int4``."""
    n = parameter_counts(config)["routed_experts"]
    return 8 * device_bytes(config, dtype, expert_format)["routed_experts"] / n


def default_expert_format(config: KimiConfig) -> str:
    """The routed experts' format ``kimi-jax convert`` produces by default for this config:
    ``int4`` when its ``quantization_config`` is compressed-tensors (INT4 experts stay 4-bit)."""
    q = config.quantization_config or {}
    return "int4" if q.get("quant_method") == "compressed-tensors" else "dense"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


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
