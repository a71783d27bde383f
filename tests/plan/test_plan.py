"""``kimi-jax plan``: bytes per device agree with ``info --mesh``, K2.5 INT4 fits 8 x H200 and
not 4, the KV cache per token, clear errors, a written layout loads, measured efficiencies."""

import json

import jax.numpy as jnp
import pytest

from kimi_jax.checkpoint.summary import bytes_per_device
from kimi_jax.cli.main import main
from kimi_jax.config.model import builtin_config_dir, kimi_k25_config
from kimi_jax.parallel.layout import load_layout, packaged_layouts
from kimi_jax.plan import Request, find_hardware, kv_bytes_per_token, plan

K25 = str(builtin_config_dir("kimi-k2.5") / "config.json")
HARDWARE = {"cpu-8": "h100", "gpu-1": "h200", "gpu-2": "h200", "gpu-8": "h200", "tpu-v5p-64": "tpu-v5p",
            "tpu-v6e-64": "tpu-v6e", "tpu-v5e-256": "tpu-v5e"}


@pytest.fixture(scope="module")
def k25():
    return kimi_k25_config()


def _plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_packaged_layout_has_hardware_here():
    assert set(packaged_layouts()) == set(HARDWARE)


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_bytes_per_device_equal_info_mesh(k25, name):
    layout = load_layout(name)
    p = plan(k25, Request(find_hardware(HARDWARE[name]), layout.size, context=4096), name)
    assert p.layout == layout
    assert p.weights_by_component == bytes_per_device(k25, layout, jnp.bfloat16, "int4")
    assert sum(p.weights_by_part.values()) == p.weights_bytes_per_device


def test_plan_json_agrees_with_info_output_to_the_byte(capsys):
    assert main(["info", K25, "--mesh", "gpu-8"]) == 0
    printed = capsys.readouterr().out.split("\nmesh gpu-8")[1].splitlines()[2:]
    info = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in printed if line.strip()}
    j = _plan_json(capsys, "--config", "kimi-k2.5", "--hardware", "h200", "--devices", "8", "--mesh", "gpu-8")
    by_component = j["weights_bytes_by_component"]
    assert info.pop("total") == sum(v for k, v in by_component.items() if k != "vision")
    assert info == by_component and j["weights_bytes_per_device"] == sum(info.values())


def test_k25_int4_fits_eight_h200_and_not_four(capsys):
    eight = _plan_json(capsys, "--config", "kimi-k2.5", "--hardware", "H200", "--devices", "8")
    four = _plan_json(capsys, K25, "--hardware", "h200", "--devices", "4", "--context", "8192")
    assert eight["fits"] and eight["experts"] == "int4" and eight["context"] == 262144
    assert eight["max_concurrent_sequences"] >= 1 and eight["max_cached_tokens"] >= 262144
    assert eight["weights_bytes_per_device"] < 141e9 / 1.5
    assert not four["fits"] and four["max_concurrent_sequences"] == 0
    assert four["weights_bytes_per_device"] > 141e9  # the fewest bytes any 4-device mesh gets
    for key in ("layout", "decode_ms_per_token", "decode_tokens_per_s", "prefill_tokens_per_s", "basis"):
        assert key in eight and key in four


def test_kv_cache_per_token(k25):
    assert kv_bytes_per_token(k25) == 70_272 == 61 * 576 * 2
    assert kv_bytes_per_token(k25, "float32") == 2 * 70_272


def test_bf16_experts_need_more_than_eight_h200(capsys):
    j = _plan_json(capsys, "--config", "kimi-k2.5", "--hardware", "h200", "--devices", "8", "--experts", "bf16")
    assert not j["fits"] and j["weights_bytes_by_part"]["experts"] > 141e9 * 0.9


def test_rooflines_are_in_the_range_the_design_notes_estimate(k25, tmp_path):
    # ~33 GB read per token at batch 1 spread over 8 H200s: about 1.1 ms (research notes);
    # no results folder, so no measured H200 rows turn the roofline into a prediction
    p = plan(k25, Request(find_hardware("h200"), 8, context=1024, concurrency=64), "gpu-8",
             results=tmp_path).to_json()
    assert 0.8 < p["decode_ms_per_token"] < 2.0
    # 64 sequences choose ~284 of 384 experts a layer: ~6x the tokens of batch 1 per step
    assert 4 * 1e3 / p["decode_ms_per_token"] < p["decode_tokens_per_s"] < 64 * 1e3 / p["decode_ms_per_token"]
    assert 1e4 < p["prefill_tokens_per_s"] < 8 * 989e12 / (2 * 32e9)  # never beyond the matmul rate
    assert p["basis"] == "roofline"


@pytest.mark.parametrize("args, message", [
    ("h200 8 --context 262145", "context 262145 is outside the model's 1..262144 positions"),
    ("h200 0", "a plan needs at least one device, got --devices 0"),
    ("a100 8", "unknown hardware 'a100'; the catalog has h100, h200, b200, mi300x, tpu-v5e, tpu-v5p, tpu-v6e"),
    ("h200 8 --mesh gpu-2", "layout gpu-2 (data=1,expert=2,tensor=1) has 2 devices, not 8"),
    ("h200 8 --hosts 3", "8 devices do not split evenly over 3 hosts"),
    ("tpu-v5p 8 --hosts 1", "8 devices per host, but a TPU v5p host has at most 4"),
])
def test_impossible_requests_get_clear_errors(capsys, args, message):
    hardware, devices, *rest = args.split()
    assert main(["plan", "--config", "kimi-k2.5", "--hardware", hardware, "--devices", devices, *rest]) == 2
    assert message in capsys.readouterr().err


def test_name_the_model_once(capsys):
    assert main(["plan", K25, "--config", "kimi-k2.5", "--hardware", "h200", "--devices", "8"]) == 2
    assert "name the model once" in capsys.readouterr().err


def test_written_layout_loads_and_gives_the_same_plan(capsys, tmp_path):
    path = tmp_path / "plan.toml"
    j = _plan_json(capsys, "--config", "kimi-k2.5", "--hardware", "tpu-v5p", "--devices", "32", "--context",
                   "32768", "--write-layout", str(path))
    layout = load_layout(path)
    assert layout.shape == j["layout"]["mesh"]
    assert {k: list(v) for k, v in layout.rules if not k.endswith("_groups")} == j["layout"]["rules"]
    again = _plan_json(capsys, "--config", "kimi-k2.5", "--hardware", "tpu-v5p", "--devices", "32", "--context",
                       "32768", "--mesh", str(path))
    assert again["weights_bytes_by_component"] == j["weights_bytes_by_component"]
    assert again["decode_ms_per_token"] == j["decode_ms_per_token"] and j["hosts"] == 8


def test_measured_efficiency_turns_the_roofline_into_a_prediction(capsys, tmp_path):
    rows = [
        {"bench": "decode", "batch": 1, "floor_ratio": 0.5, "bandwidth_tb_s": 2.4, "gpu": "NVIDIA H200"},
        {"bench": "decode", "batch": 64, "floor_ratio": 0.8, "bandwidth_tb_s": 4.8, "gpu": "NVIDIA H200"},
        {"bench": "decode", "batch": 1, "floor_ratio": 0.9, "bandwidth_tb_s": 3.0, "gpu": "NVIDIA H100 80GB HBM3"},
        {"bench": "mla", "batch": 1, "floor_ratio": 0.1, "bandwidth_tb_s": 4.8, "gpu": "NVIDIA H200"},
    ]
    (tmp_path / "engine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--config", "kimi-k2.5", "--hardware", "h200", "--devices", "8", "--mesh", "gpu-8", "--context", "4096",
            "--concurrency", "50"]
    roofline = _plan_json(capsys, *args, "--results", str(tmp_path / "none"))
    predicted = _plan_json(capsys, *args, "--results", str(tmp_path))
    assert roofline["basis"] == "roofline" and predicted["basis"] == "measured"
    assert predicted["decode_efficiency"] == pytest.approx([0.25, 0.8])  # 0.5 at 2.4 of the catalog's 4.8 TB/s
    assert predicted["decode_ms_per_token"] == pytest.approx(4 * roofline["decode_ms_per_token"])
    assert predicted["decode_tokens_per_s"] == pytest.approx(0.8 * roofline["decode_tokens_per_s"])


def test_text_report(capsys, tmp_path):
    assert main(["plan", "--config", "kimi-k2.5", "--hardware", "b200", "--devices", "8", "--context", "131072",
                 "--concurrency", "4", "--write-layout", str(tmp_path / "b200.toml")]) == 0
    out = capsys.readouterr().out
    for text in ("fits            yes", "70,272 bytes per token", "of decoder parameters per device",
                 "ms per token at batch 1", "tokens/s in chunks of 512", "recommended", "(roofline)",
                 f"wrote the layout to {tmp_path / 'b200.toml'}"):
        assert text in out
