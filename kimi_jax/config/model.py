"""Model configuration read from a checkpoint's ``config.json``.

Three spellings are accepted: Moonshot's K2.5 wrapper (``model_type: kimi_k25`` with a
``text_config`` and a ``vision_config``), plain DeepSeek-V3 / Kimi K2 text configs, and
the files transformers 5 writes (``rope_parameters`` instead of ``rope_scaling``). Every
number comes from the file; derived values are properties. Values this implementation
does not support raise :class:`UnsupportedConfigError` naming the key.

Every field the model uses is checked when the file is read: integers must be JSON integers
(not ``true``, ``"3"`` or ``3.5``) within their range (sizes, layer and head counts, ranks and
experts at least 1), numbers must be finite (``rms_norm_eps`` and ``rope_theta`` positive),
the MoE routing must be consistent (``n_group`` divides ``n_routed_experts``,
``1 <= topk_group <= n_group``, ``1 <= num_experts_per_tok <=`` the experts of the kept
groups), and token ids (``bos`` / ``eos`` / ``pad`` / ``media_placeholder_token_id``) must be
integers below ``vocab_size`` (negative ones, Hugging Face's "none", are kept). The error names the field and, from :meth:`KimiConfig.from_file`, the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
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


_MISSING = object()


def is_int(value: Any) -> bool:
    """A JSON integer: an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


class Fields:
    """Typed, range-checked reads of one config block (a mapping), for error messages named
    ``{where}{key}`` (``where`` is ``""`` or a block prefix such as ``"text_config."``)."""

    def __init__(self, d: Any, where: str = ""):
        if not isinstance(d, Mapping):
            name = where.rstrip(".") or "the config"
            raise UnsupportedConfigError(f"config: {name} must be a JSON object, got {type(d).__name__} {d!r:.60}")
        self.d, self.where = d, where

    def _bad(self, key: str, value: Any, what: str) -> UnsupportedConfigError:
        return UnsupportedConfigError(f"config: {self.where}{key}={value!r:.60} is not supported ({what})")

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value of ``key`` (``None`` counts as absent); ``default`` if absent, else an error."""
        value = self.d.get(key)
        if value is None:
            if default is _MISSING:
                block = self.where.rstrip(".") or "the config"
                raise UnsupportedConfigError(f"config: {block} has no {key!r}")
            return default
        return value

    def int(self, key: str, default: Any = _MISSING, *, min: int = 1, max: int | None = None,
            max_name: str = "") -> Any:
        """An integer in ``[min, max]`` (``default``, possibly None, when absent)."""
        value = self.raw(key, default)
        if value is None and default is None:
            return None
        if not is_int(value):
            raise self._bad(key, value, "must be an integer")
        if value < min or (max is not None and value > max):
            upper = "" if max is None else f" and <= {max_name or max}"
            raise self._bad(key, value, f"must be >= {min}{upper}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = False, min: float | None = None) -> float:
        """A finite number (an int or a float, not a bool), > 0 with ``positive``, >= ``min``."""
        value = self.raw(key, default)
        if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise self._bad(key, value, "must be a finite number")
        if positive and value <= 0:
            raise self._bad(key, value, "must be > 0")
        if min is not None and value < min:
            raise self._bad(key, value, f"must be >= {min}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "must be true or false")
        return value

    def mapping(self, key: str) -> dict[str, Any] | None:
        """A JSON object or absent (None)."""
        value = self.raw(key, None)
        if value is not None and not isinstance(value, Mapping):
            raise self._bad(key, value, "must be a JSON object")
        return value

    def token_ids(self, key: str, vocab_size: int, *, many: bool = False) -> tuple[int, ...]:
        """Token ids below ``vocab_size``: one int, or with ``many`` also a list of ints; () if absent.

        Negative ids are accepted, as Hugging Face configs use them (``-1``) for "no such token":
        no input id can equal one (the model refuses negative ids).
        """
        value = self.raw(key, None)
        if value is None:
            return ()
        ids = value if many and isinstance(value, list) else [value]
        what = "must be a token id" + (" or a list of token ids" if many else "")
        if not ids or not all(is_int(i) for i in ids):
            raise self._bad(key, value, what)
        for i in ids:
            if i >= vocab_size:
                raise self._bad(key, value, f"token id {i} is outside the vocabulary [0, {vocab_size})")
        return tuple(ids)


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
    def layer_runs(self) -> tuple[tuple[int, int], ...]:
        """(first layer, number of layers) of each run of identical decoder layers: the dense
        layers, then the MoE layers (the model scans each run)."""
        k = min(self.first_k_dense_replace, self.num_hidden_layers)
        return tuple((start, n) for start, n in ((0, k), (k, self.num_hidden_layers - k)) if n)

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
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "") -> TextConfig:
        """Builds the config from a (text) config dict, checking every field the model uses.

        ``where`` prefixes the keys in error messages (``"text_config."`` inside K2.5's wrapper).
        """
        f = Fields(d, where)
        rope_theta, rope_scaling = _read_rope(f)
        num_heads = f.int("num_attention_heads")
        kv_heads = f.raw("num_key_value_heads", num_heads)
        _require(kv_heads == num_heads, f"{where}num_key_value_heads", kv_heads,
                 "MLA uses one KV head per query head")
        _require(f.raw("hidden_act", "silu") == "silu", f"{where}hidden_act", f.raw("hidden_act", None), "only silu")
        _require(f.raw("attention_bias", False) is False, f"{where}attention_bias", f.raw("attention_bias", None),
                 "only false")
        _require(f.raw("moe_layer_freq", 1) == 1, f"{where}moe_layer_freq", f.raw("moe_layer_freq", None), "only 1")
        _require(f.raw("scoring_func", "sigmoid") == "sigmoid", f"{where}scoring_func", f.raw("scoring_func", None),
                 "only sigmoid")
        _require(f.raw("topk_method", "noaux_tc") == "noaux_tc", f"{where}topk_method", f.raw("topk_method", None),
                 "only noaux_tc")
        _require(f.raw("tie_word_embeddings", False) is False, f"{where}tie_word_embeddings",
                 f.raw("tie_word_embeddings", None), "Kimi has an untied lm_head")
        n_experts = f.int("n_routed_experts")
        n_group = f.int("n_group", 1)
        topk_group = f.int("topk_group", 1, max=n_group, max_name=f"n_group={n_group}")
        _require(n_experts % n_group == 0, f"{where}n_group", n_group, f"must divide n_routed_experts={n_experts}")
        _require(n_experts // n_group >= 2 or n_group == 1, f"{where}n_group", n_group,
                 "groups need at least 2 experts")
        kept = topk_group * (n_experts // n_group)
        top_k = f.int("num_experts_per_tok", max=kept,
                      max_name=f"the {kept} experts of the kept groups" if kept < n_experts
                      else f"n_routed_experts={n_experts}")
        rope_dim = f.int("qk_rope_head_dim", min=2)
        _require(rope_dim % 2 == 0, f"{where}qk_rope_head_dim", rope_dim, "RoPE rotates pairs: must be even")
        num_layers = f.int("num_hidden_layers")
        return cls(
            vocab_size=f.int("vocab_size"),
            hidden_size=f.int("hidden_size"),
            intermediate_size=f.int("intermediate_size"),
            moe_intermediate_size=f.int("moe_intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            q_lora_rank=f.int("q_lora_rank", None),
            kv_lora_rank=f.int("kv_lora_rank"),
            qk_nope_head_dim=f.int("qk_nope_head_dim"),
            qk_rope_head_dim=rope_dim,
            v_head_dim=f.int("v_head_dim"),
            n_routed_experts=n_experts,
            num_experts_per_tok=top_k,
            n_shared_experts=f.int("n_shared_experts", 0, min=0),
            n_group=n_group,
            topk_group=topk_group,
            first_k_dense_replace=f.int("first_k_dense_replace", 0, min=0),
            norm_topk_prob=f.bool("norm_topk_prob", True),
            routed_scaling_factor=f.number("routed_scaling_factor", 1.0, positive=True),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6, positive=True),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=f.int("max_position_embeddings"),
            num_nextn_predict_layers=f.int("num_nextn_predict_layers", 0, min=0),
        )


def _read_rope(f: Fields) -> tuple[float, YarnScaling | None]:
    """Reads ``rope_theta`` and YaRN from either ``rope_scaling`` or ``rope_parameters``."""
    key = "rope_parameters" if f.d.get("rope_parameters") else "rope_scaling"
    params = Fields(f.mapping(key) or {}, f"{f.where}{key}.")
    theta = (params if params.d.get("rope_theta") is not None else f).number("rope_theta", positive=True)
    kind = params.raw("rope_type", params.raw("type", "default"))
    if kind == "default":
        return theta, None
    _require(kind == "yarn", f"{f.where}{key}.type", kind, "only yarn or none")
    if params.d.get("factor") is None or params.d.get("original_max_position_embeddings") is None:
        missing = "factor" if params.d.get("factor") is None else "original_max_position_embeddings"
        raise UnsupportedConfigError(f"config: the yarn rope scaling has no {missing!r}")
    return theta, YarnScaling(
        factor=params.number("factor", positive=True),
        original_max_position_embeddings=params.int("original_max_position_embeddings"),
        beta_fast=params.number("beta_fast", 32.0),
        beta_slow=params.number("beta_slow", 1.0),
        mscale=params.number("mscale", 1.0),
        mscale_all_dim=params.number("mscale_all_dim", 0.0),
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
    eos_token_ids: tuple[int, ...] = ()
    """Every id of ``eos_token_id`` (the file may give a list); ``eos_token_id`` is the first."""

    @property
    def is_multimodal(self) -> bool:
        return self.vision_config is not None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KimiConfig:
        """Builds and checks the config from a ``config.json``'s contents (see the module doc)."""
        top = Fields(d)
        if d.get("text_config") is not None:
            text_f = Fields(d["text_config"], "text_config.")
        elif "hidden_size" in d:
            text_f = top
        else:
            raise UnsupportedConfigError("config: neither a 'text_config' nor a text model's keys")
        text = TextConfig.from_dict(text_f.d, where=text_f.where)
        quant = text_f.mapping("quantization_config") or top.mapping("quantization_config")
        vision = top.mapping("vision_config")
        model_type = top.raw("model_type", text_f.raw("model_type", "deepseek_v3"))
        _require(isinstance(model_type, str), "model_type", model_type, "must be a string")

        def ids(key: str, *, many: bool = False) -> tuple[int, ...]:
            f = top if top.d.get(key) is not None else text_f
            return f.token_ids(key, text.vocab_size, many=many)

        eos = ids("eos_token_id", many=True)
        media = ids("media_placeholder_token_id")
        if vision is not None:
            _check_vision(vision, text, media)
        return cls(
            text=text,
            model_type=model_type,
            vision_config=vision,
            quantization_config=quant,
            bos_token_id=next(iter(ids("bos_token_id")), None),
            eos_token_id=eos[0] if eos else None,
            pad_token_id=next(iter(ids("pad_token_id")), None),
            media_placeholder_token_id=media[0] if media else None,
            raw=d,
            eos_token_ids=eos,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> KimiConfig:
        """Reads ``config.json`` (or the ``config.json`` inside a folder); errors name the file."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except UnsupportedConfigError as e:
            raise UnsupportedConfigError(f"{path}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=2, sort_keys=False)


def _check_vision(vision: Mapping[str, Any], text: TextConfig, media: tuple[int, ...]) -> None:
    """The vision block's own checks (``VisionConfig.from_dict``) and how it meets the decoder."""
    from kimi_jax.model.vision import VisionConfig  # the model imports this module

    cfg = VisionConfig.from_dict(vision)
    _require(cfg.text_hidden_size == text.hidden_size, "vision_config.text_hidden_size", cfg.text_hidden_size,
             f"must equal the decoder's hidden_size={text.hidden_size}")
    if not media:
        raise UnsupportedConfigError("config: a vision_config needs a 'media_placeholder_token_id'")


def builtin_config_dir(name: str = "kimi-k2.5") -> Path:
    """The folder of a real model's config files shipped with the package."""
    path = resources.files("kimi_jax.config") / "presets" / name
    if not path.is_dir():
        raise FileNotFoundError(f"no built-in config named {name!r}")
    return Path(str(path))


def kimi_k25_config() -> KimiConfig:
    """The real Kimi K2.5 config, as Moonshot ships it."""
    return KimiConfig.from_file(builtin_config_dir("kimi-k2.5") / "config.json")
