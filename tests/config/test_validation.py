"""Config validation: wrong types and ranges in config.json / generation_config.json name the field and the file."""

import json

import pytest

from kimi_jax.config.model import KimiConfig, UnsupportedConfigError, builtin_config_dir
from kimi_jax.inference.generate import generation_stop_ids
from kimi_jax.model.vision import VisionConfig
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config


def real() -> dict:
    return json.loads((builtin_config_dir() / "config.json").read_text())


def with_text(**changes) -> dict:
    d = real()
    d["text_config"].update(changes)
    return d


def test_shipped_and_fixture_configs_validate(fixtures):
    for path in [builtin_config_dir() / "config.json", *sorted((fixtures / "golden").glob("*/config.json"))]:
        KimiConfig.from_file(path)
    for folder in [builtin_config_dir(), *sorted((fixtures / "golden").iterdir())]:
        assert all(isinstance(i, int) for i in generation_stop_ids(folder))
    KimiConfig.from_dict(k25_config(TINY_TEXT))


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("num_hidden_layers", "3", "must be an integer"),
        ("hidden_size", 3.5, "must be an integer"),
        ("n_routed_experts", "16", "must be an integer"),
        ("vocab_size", 163840.0, "must be an integer"),
        ("num_attention_heads", True, "must be an integer"),
        ("kv_lora_rank", 0, ">= 1"),
        ("q_lora_rank", -4, ">= 1"),
        ("num_experts_per_tok", 0, ">= 1"),
        ("num_experts_per_tok", 385, "n_routed_experts=384"),
        ("max_position_embeddings", -1, ">= 1"),
        ("max_position_embeddings", 0, ">= 1"),
        ("qk_rope_head_dim", 63, "even"),
        ("first_k_dense_replace", -1, ">= 0"),
        ("n_shared_experts", "1", "must be an integer"),
        ("rms_norm_eps", 0, "> 0"),
        ("rms_norm_eps", "1e-5", "finite number"),
        ("routed_scaling_factor", float("nan"), "finite number"),
        ("rope_theta", -1.0, "> 0"),
        ("norm_topk_prob", "yes", "true or false"),
        ("n_group", 0, ">= 1"),
        ("topk_group", 0, ">= 1 and <= n_group=1"),
        ("num_nextn_predict_layers", 1.5, "must be an integer"),
        ("quantization_config", "int4", "JSON object"),
    ],
)
def test_text_fields(key, value, words):
    with pytest.raises(UnsupportedConfigError, match=rf"text_config\.{key}=.*{words}"):
        KimiConfig.from_dict(with_text(**{key: value}))
    plain = {**real()["text_config"], key: value}  # a plain text config names the bare key
    with pytest.raises(UnsupportedConfigError, match=rf"config: {key}=.*{words}"):
        KimiConfig.from_dict(plain)


def test_routing_limits_name_the_kept_groups():
    d = with_text(n_group=8, topk_group=2, num_experts_per_tok=97)  # 2 groups of 48 experts kept
    with pytest.raises(UnsupportedConfigError, match="num_experts_per_tok=97.*96 experts of the kept groups"):
        KimiConfig.from_dict(d)
    assert KimiConfig.from_dict(with_text(n_group=8, topk_group=2, num_experts_per_tok=96)).text.num_experts_per_tok == 96


def test_rope_scaling_fields():
    d = real()
    d["text_config"]["rope_scaling"]["factor"] = "64"
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling\.factor"):
        KimiConfig.from_dict(d)
    d = real()
    d["text_config"]["rope_scaling"]["original_max_position_embeddings"] = 4096.5
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling\.original_max_position_embeddings"):
        KimiConfig.from_dict(d)
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling.*JSON object"):
        KimiConfig.from_dict(with_text(rope_scaling="yarn"))


@pytest.mark.parametrize("block", ["x", 3, ["hidden_size"]])
def test_text_config_must_be_a_mapping(block):
    with pytest.raises(UnsupportedConfigError, match="text_config must be a JSON object"):
        KimiConfig.from_dict({**real(), "text_config": block})


def test_whole_file_must_be_a_mapping(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UnsupportedConfigError, match="config.json.*must be a JSON object"):
        KimiConfig.from_file(tmp_path)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("eos_token_id", "x", "eos_token_id='x'.*token id"),
        ("eos_token_id", 163840, "outside the vocabulary"),
        ("eos_token_id", [163585, "x"], "list of token ids"),
        ("eos_token_id", [], "list of token ids"),
        ("eos_token_id", True, "token id"),
        ("bos_token_id", 1.5, "bos_token_id"),
        ("pad_token_id", 10**6, "pad_token_id.*outside the vocabulary"),
        ("media_placeholder_token_id", [163605], "media_placeholder_token_id"),
        ("media_placeholder_token_id", 200000, "outside the vocabulary"),
    ],
)
def test_token_ids(key, value, words):
    with pytest.raises(UnsupportedConfigError, match=words):
        KimiConfig.from_dict({**real(), key: value})


def test_eos_list_and_negative_none():
    cfg = KimiConfig.from_dict({**real(), "eos_token_id": [163585, 163586]})
    assert cfg.eos_token_id == 163585 and cfg.eos_token_ids == (163585, 163586)
    assert KimiConfig.from_dict({**real(), "pad_token_id": -1}).pad_token_id == -1  # HF's "no such token"


def test_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(with_text(num_experts_per_tok=0)))
    with pytest.raises(UnsupportedConfigError, match=r"config\.json: config: text_config\.num_experts_per_tok=0"):
        KimiConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**real(), "eos_token_id": "x"}))
    with pytest.raises(UnsupportedConfigError, match=r"config\.json: .*eos_token_id='x'") as e:
        KimiConfig.from_file(tmp_path / "config.json")
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("vt_hidden_size", "1152", "must be an integer"),
        ("vt_num_hidden_layers", 0, ">= 1"),
        ("patch_size", 14.0, "must be an integer"),
        ("init_pos_emb_time", -1, ">= 1"),
        ("vt_intermediate_size", False, "must be an integer"),
        ("merge_kernel_size", [2, "2"], "two positive ints"),
        ("merge_kernel_size", "2", "two positive ints"),
        ("merge_kernel_size", [2, 0], "two positive ints"),
        ("projector_ln_eps", 0.0, "> 0"),
        ("text_hidden_size", 3.5, "must be an integer"),
    ],
)
def test_vision_fields(key, value, words):
    d = {**real()["vision_config"], key: value}
    with pytest.raises(UnsupportedConfigError, match=rf"vision_config\.{key}.*{words}"):
        VisionConfig.from_dict(d)
    with pytest.raises(UnsupportedConfigError, match=rf"vision_config\.{key}"):  # when the file is read, too
        KimiConfig.from_dict({**real(), "vision_config": d})


def test_vision_config_block():
    with pytest.raises(UnsupportedConfigError, match="vision_config must be a JSON object"):
        VisionConfig.from_dict("siglip")
    with pytest.raises(UnsupportedConfigError, match="vision_config=.*JSON object"):
        KimiConfig.from_dict({**real(), "vision_config": "siglip"})
    with pytest.raises(UnsupportedConfigError, match="text_hidden_size.*hidden_size=7168"):
        KimiConfig.from_dict({**real(), "vision_config": {**real()["vision_config"], "text_hidden_size": 64}})
    d = real()
    del d["media_placeholder_token_id"]
    with pytest.raises(UnsupportedConfigError, match="media_placeholder_token_id"):
        KimiConfig.from_dict(d)


@pytest.mark.parametrize("eos", ['"x"', "[1, \"2\"]", "1.5", "true", "-3", '{"id": 1}'])
def test_generation_config_eos(tmp_path, eos):
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": {eos}}}')
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id=.*not a token id"):
        generation_stop_ids(tmp_path)


def test_generation_config_file(tmp_path):
    assert generation_stop_ids(tmp_path) == []
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON"):
        generation_stop_ids(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, 7]}')
    assert generation_stop_ids(tmp_path) == [5, 7]
