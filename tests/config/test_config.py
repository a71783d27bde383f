"""Config reading: the real K2.5 file, other spellings, and unsupported values."""

import json

import pytest

from kimi_jax.config.model import (
    KimiConfig,
    UnsupportedConfigError,
    builtin_config_dir,
    kimi_k25_config,
)
from kimi_jax.model.layers import yarn_correction_range


def real_text() -> dict:
    return json.loads((builtin_config_dir() / "config.json").read_text())["text_config"]


def test_real_k25_config():
    cfg = kimi_k25_config()
    t = cfg.text
    assert cfg.model_type == "kimi_k25" and cfg.is_multimodal
    assert (t.hidden_size, t.num_hidden_layers, t.n_routed_experts, t.num_experts_per_tok) == (7168, 61, 384, 8)
    assert (t.q_lora_rank, t.kv_lora_rank, t.qk_head_dim, t.v_head_dim) == (1536, 512, 192, 128)
    assert t.rope_scaling.factor == 64 and t.rope_scaling.original_max_position_embeddings == 4096
    assert t.softmax_scale == pytest.approx(0.1446796, rel=1e-6)
    assert yarn_correction_range(t) == (8, 20)
    assert cfg.quantization_config["format"] == "pack-quantized"
    assert cfg.media_placeholder_token_id == 163605 and cfg.pad_token_id == 163839
    assert hash(cfg) == hash(kimi_k25_config())


def test_plain_text_config_and_rope_parameters_spelling():
    raw = real_text()
    a = KimiConfig.from_dict(raw)
    b = dict(raw)
    scaling = b.pop("rope_scaling")
    b["rope_parameters"] = {"rope_type": "yarn", "rope_theta": b.pop("rope_theta"),
                            **{k: v for k, v in scaling.items() if k != "type"}}
    assert KimiConfig.from_dict(b).text == a.text
    assert a.vision_config is None and not a.is_multimodal


def test_q_lora_null_and_no_rope_scaling():
    raw = dict(real_text(), q_lora_rank=None)
    del raw["rope_scaling"]
    t = KimiConfig.from_dict(raw).text
    assert t.q_lora_rank is None and t.rope_scaling is None
    assert t.softmax_scale == pytest.approx(192**-0.5)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("scoring_func", "softmax", "scoring_func"),
        ("topk_method", "greedy", "topk_method"),
        ("hidden_act", "gelu", "hidden_act"),
        ("num_key_value_heads", 8, "num_key_value_heads"),
        ("n_group", 5, "n_group"),
        ("topk_group", 3, "topk_group"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling.type"),
        ("attention_bias", True, "attention_bias"),
    ],
)
def test_unsupported_values_name_the_key(key, value, words):
    raw = dict(real_text(), **{key: value})
    with pytest.raises(UnsupportedConfigError, match=words):
        KimiConfig.from_dict(raw)


def test_missing_key_and_bad_files(tmp_path):
    raw = real_text()
    del raw["kv_lora_rank"]
    with pytest.raises(UnsupportedConfigError, match="kv_lora_rank"):
        KimiConfig.from_dict(raw)
    with pytest.raises(FileNotFoundError, match="no config file"):
        KimiConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        KimiConfig.from_file(tmp_path)
