"""Model configuration read from a checkpoint's ``config.json``.

Three spellings are accepted: Moonshot's K2.5 wrapper (``model_type: kimi_k25`` with a
``text_config`` and a ``vision_config``), plain DeepSeek-V3 / Kimi K2 text configs, and
the files transformers 5 writes (``rope_parameters`` instead of ``rope_scaling``). Every
number comes from the file; derived values are properties. Values this implementation
does not support raise :class:`UnsupportedConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

QK_NORM_EPS = 1e-6
"""Epsilon of ``q_a_layernorm`` / ``kv_a_layernorm``: the reference builds them without one."""


class UnsupportedConfigError(ValueError):
    """A config value this implementation does not support."""


def _require(cond: bool, key: str, value: Any, supported: str) -> None:
    if not cond:
        raise UnsupportedConfigError(f"config: {key}={value!r} is not supported ({supported})")


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling (``rope_scaling`` / ``rope_parameters`` with type ``yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's attention-temperature factor ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The DeepSeek-V3-architecture decoder of Kimi K2 / K2.5."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: YarnScaling | None
    max_position_embeddings: int
    num_nextn_predict_layers: int = 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            scale *= yarn_mscale(y.factor, y.mscale_all_dim) ** 2
        return scale

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        """Builds the config from a (text) config dict, checking what is supported."""
        get = _Getter(d, "text_config")
        rope_theta, rope_scaling = _read_rope(d)
        num_heads = get("num_attention_heads")
        kv_heads = d.get("num_key_value_heads", num_heads)
        _require(kv_heads == num_heads, "num_key_value_heads", kv_heads, "MLA uses one KV head per query head")
        _require(d.get("hidden_act", "silu") == "silu", "hidden_act", d.get("hidden_act"), "only silu")
        _require(not d.get("attention_bias", False), "attention_bias", d.get("attention_bias"), "only false")
        _require(d.get("moe_layer_freq", 1) == 1, "moe_layer_freq", d.get("moe_layer_freq"), "only 1")
        _require(d.get("scoring_func", "sigmoid") == "sigmoid", "scoring_func", d.get("scoring_func"), "only sigmoid")
        _require(d.get("topk_method", "noaux_tc") == "noaux_tc", "topk_method", d.get("topk_method"), "only noaux_tc")
        _require(not d.get("tie_word_embeddings", False), "tie_word_embeddings", True, "Kimi has an untied lm_head")
        n_experts = get("n_routed_experts")
        n_group = d.get("n_group") or 1
        topk_group = d.get("topk_group") or 1
        top_k = get("num_experts_per_tok")
        _require(n_experts % n_group == 0, "n_group", n_group, f"must divide n_routed_experts={n_experts}")
        _require(1 <= topk_group <= n_group, "topk_group", topk_group, f"must be in [1, n_group={n_group}]")
        _require(n_experts // n_group >= 2 or n_group == 1, "n_group", n_group, "groups need at least 2 experts")
        _require(top_k <= topk_group * (n_experts // n_group), "num_experts_per_tok", top_k,
                 "more than the experts in the kept groups")
        q_lora = d.get("q_lora_rank")
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            moe_intermediate_size=get("moe_intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=num_heads,
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=get("kv_lora_rank"),
            qk_nope_head_dim=get("qk_nope_head_dim"),
            qk_rope_head_dim=get("qk_rope_head_dim"),
            v_head_dim=get("v_head_dim"),
            n_routed_experts=n_experts,
            num_experts_per_tok=top_k,
            n_shared_experts=d.get("n_shared_experts") or 0,
            n_group=n_group,
            topk_group=topk_group,
            first_k_dense_replace=d.get("first_k_dense_replace", 0),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings"),
            num_nextn_predict_layers=d.get("num_nextn_predict_layers") or 0,
        )


class _Getter:
    """Reads required keys with an error naming the missing key."""

    def __init__(self, d: dict[str, Any], where: str):
        self.d, self.where = d, where

    def __call__(self, key: str) -> Any:
        if key not in self.d or self.d[key] is None:
            raise UnsupportedConfigError(f"config: {self.where} has no {key!r}")
        return self.d[key]


def _read_rope(d: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    """Reads ``rope_theta`` and YaRN from either ``rope_scaling`` or ``rope_parameters``."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise UnsupportedConfigError("config: text_config has no 'rope_theta'")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    _require(kind == "yarn", "rope_scaling.type", kind, "only yarn or none")
    for key in ("factor", "original_max_position_embeddings"):
        if params.get(key) is None:
            raise UnsupportedConfigError(f"config: the yarn rope scaling has no {key!r}")
    return float(theta), YarnScaling(
        factor=float(params["factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        mscale=float(params.get("mscale", 1.0)),
        mscale_all_dim=float(params.get("mscale_all_dim", 0.0)),
    )


@dataclasses.dataclass(frozen=True)
class KimiConfig:
    """A whole checkpoint's config: the decoder plus, for K2.5, the vision and quantization blocks.

    ``vision_config`` and ``quantization_config`` are kept as the file has them; the modules
    that use them parse them.
    """

    text: TextConfig
    model_type: str
    vision_config: dict[str, Any] | None = dataclasses.field(hash=False)
    quantization_config: dict[str, Any] | None = dataclasses.field(hash=False)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    media_placeholder_token_id: int | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def is_multimodal(self) -> bool:
        return self.vision_config is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KimiConfig:
        text_d = d.get("text_config")
        if text_d is None:
            if "hidden_size" not in d:
                raise UnsupportedConfigError("config: neither a 'text_config' nor a text model's keys")
            text_d = d
        quant = text_d.get("quantization_config") or d.get("quantization_config")
        return cls(
            text=TextConfig.from_dict(text_d),
            model_type=d.get("model_type", text_d.get("model_type", "deepseek_v3")),
            vision_config=d.get("vision_config"),
            quantization_config=quant,
            bos_token_id=d.get("bos_token_id", text_d.get("bos_token_id")),
            eos_token_id=d.get("eos_token_id", text_d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id", text_d.get("pad_token_id")),
            media_placeholder_token_id=d.get("media_placeholder_token_id"),
            raw=d,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> KimiConfig:
        """Reads ``config.json`` (or the ``config.json`` inside a folder)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=2, sort_keys=False)


def builtin_config_dir(name: str = "kimi-k2.5") -> Path:
    """The folder of a real model's config files shipped with the package."""
    path = resources.files("kimi_jax.config") / "presets" / name
    if not path.is_dir():
        raise FileNotFoundError(f"no built-in config named {name!r}")
    return Path(str(path))


def kimi_k25_config() -> KimiConfig:
    """The real Kimi K2.5 config, as Moonshot ships it."""
    return KimiConfig.from_file(builtin_config_dir("kimi-k2.5") / "config.json")
