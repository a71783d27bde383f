"""Quantized checkpoints through the converter, against transformers run on the dequantized weights.

* INT4: a tiny K2.5-layout checkpoint whose routed experts are quantized and packed by the
  compressed-tensors library itself, with K2.5's real ``quantization_config``; its twin
  holds compressed-tensors' own decompression (W = q * scale, float32).
* FP8: a tiny DeepSeek-V3-layout checkpoint with every decoder linear in float8 e4m3 and one
  ``weight_scale_inv`` per 128 x 128 block (edge blocks partial); its twin is dequantized in torch.
* Corrupt quantized tensors fail before anything is written, naming the tensor.
"""

import json
import re

import ml_dtypes
import numpy as np
import pytest

import kimi_jax
from kimi_jax import ConversionError
from kimi_jax.config.model import builtin_config_dir
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

torch = pytest.importorskip("torch")
from compressed_tensors.compressors.pack_quantized.base import (
    PackedQuantizationCompressor,  # noqa: E402
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from hf_reference import hf_logits, load_hf_text_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.reference

YARN = dict(type="yarn", factor=8.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
            mscale=1.0, mscale_all_dim=1.0)
# Sizes pairwise distinct; INT4 in-features (hidden, moe_intermediate) are multiples of 32.
INT4_TEXT = dict(vocab_size=320, hidden_size=96, intermediate_size=136, moe_intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=5, q_lora_rank=56, kv_lora_rank=24, qk_nope_head_dim=12,
                 qk_rope_head_dim=8, v_head_dim=14, n_routed_experts=10, num_experts_per_tok=3,
                 first_k_dense_replace=1, max_position_embeddings=1024, rope_scaling=YARN)
# FP8: hidden 160, intermediate 200, q_lora 136 span two 128-blocks with partial edges.
FP8_TEXT = dict(vocab_size=288, hidden_size=160, intermediate_size=200, moe_intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=3, q_lora_rank=136, kv_lora_rank=24, qk_nope_head_dim=12,
                qk_rope_head_dim=8, v_head_dim=14, n_routed_experts=6, num_experts_per_tok=2,
                first_k_dense_replace=1, max_position_embeddings=1024, rope_scaling=YARN)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
DECODER_LINEAR = re.compile(
    r"\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
SEQ = 40  # longer than original_max_position_embeddings


def write_folder(folder, config: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def rel(a, b):
    return np.abs(np.asarray(a) - b).max() / np.abs(b).max()


# ---------------------------------------------------------------------------- INT4


def int4_compress(w: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """compressed-tensors' INT4 of a float [out, in]: scales (group absmax / 7.5) in bf16, then its packer."""
    groups = w.reshape(w.shape[0], -1, scheme.weights.group_size)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    return PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale.to(torch.bfloat16)}, scheme)


@pytest.fixture(scope="module")
def int4_case(tmp_path_factory):
    work = tmp_path_factory.mktemp("int4")
    cfg = k25_config(INT4_TEXT, multimodal=False)
    qcfg = json.loads((builtin_config_dir("kimi-k2.5") / "config.json").read_text())["text_config"]
    cfg["text_config"]["quantization_config"] = qcfg["quantization_config"]
    scheme = QuantizationConfig.model_validate(qcfg["quantization_config"]).config_groups["group_0"]
    floats = load_file(write_checkpoint(work / "float", cfg, seed=5, dtype="float32") / "model.safetensors")
    quantized, twin = {}, {}
    for name, w in floats.items():
        if ROUTED_EXPERT.search(name):
            module = name.removesuffix(".weight")
            sd = int4_compress(w, scheme)
            quantized.update({f"{module}.{k}": v for k, v in sd.items()})
            twin[name] = PackedQuantizationCompressor.decompress(dict(sd, weight_scale=sd["weight_scale"].float()),
                                                                 scheme)["weight"]
        else:
            quantized[name] = twin[name] = w
    assert quantized["language_model.model.layers.1.mlp.experts.0.up_proj.weight_scale"].dtype == torch.bfloat16
    write_folder(work / "int4", cfg, quantized)
    write_folder(work / "twin", cfg, twin)
    ref = load_hf_text_model(work / "twin", work / "hf")
    ids = np.random.default_rng(0).integers(0, INT4_TEXT["vocab_size"], (2, SEQ))
    kimi_jax.convert(work / "int4", work / "kept", dtype="float32", progress=False)
    kimi_jax.convert(work / "int4", work / "dequantized", dtype="float32", dequantize=True, progress=False)
    return work, ids, hf_logits(ref, ids)


@pytest.mark.parametrize("fmt, impl", [("kept", "grouped"), ("kept", "reference"), ("dequantized", "grouped")])
def test_int4_matches_transformers(int4_case, fmt, impl):
    work, ids, theirs = int4_case
    model = kimi_jax.load(work / fmt, moe_impl=impl)
    assert json.loads((work / fmt / "kimi_jax.json").read_text())["expert_format"] == (
        "int4" if fmt == "kept" else "dense")
    ours = np.asarray(model(ids))
    err = rel(ours, theirs)
    print(f"INT4 {fmt} {impl}: max |logit diff| / max |logit| = {err:.2e}")
    assert err < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


# ---------------------------------------------------------------------------- FP8


def fp8_block_quantize(w: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 weight_scale_inv per block, the dequantized float32 weight), DeepSeek-V3 style."""
    (out, inp), (bo, bi) = w.shape, block
    padded = torch.nn.functional.pad(w, (0, -inp % bi, 0, -out % bo))
    gi, gj = padded.shape[0] // bo, padded.shape[1] // bi
    blocks = padded.reshape(gi, bo, gj, bi)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    full = scale_inv.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    q = (padded / full)[:out, :inp].to(torch.float8_e4m3fn)
    return q, scale_inv, q.float() * full[:out, :inp]


@pytest.fixture(scope="module")
def fp8_case(tmp_path_factory):
    work = tmp_path_factory.mktemp("fp8")
    cfg = dict(k25_config(FP8_TEXT, multimodal=False)["text_config"], quantization_config=FP8_CONFIG)
    floats = load_file(write_checkpoint(work / "float", cfg, seed=7, dtype="float32", k25_names=False)
                       / "model.safetensors")
    quantized, twin, grids = {}, {}, set()
    for name, w in floats.items():
        if DECODER_LINEAR.search(name):
            q, scale_inv, twin[name] = fp8_block_quantize(w)
            quantized[name], quantized[name.removesuffix(".weight") + ".weight_scale_inv"] = q, scale_inv
            grids.add((tuple(w.shape), tuple(scale_inv.shape)))
        else:
            quantized[name] = twin[name] = w
    assert ((136, 160), (2, 2)) in grids and ((200, 160), (2, 2)) in grids  # partial edge blocks
    write_folder(work / "fp8", cfg, quantized)
    write_folder(work / "twin", cfg, twin)
    return work, twin


def test_fp8_matches_transformers(fp8_case):
    work, _ = fp8_case
    ref = load_hf_text_model(work / "twin", work / "hf")
    kimi_jax.convert(work / "fp8", work / "converted", dtype="float32", progress=False)
    assert json.loads((work / "converted" / "kimi_jax.json").read_text())["expert_format"] == "dense"
    ids = np.random.default_rng(1).integers(0, FP8_TEXT["vocab_size"], (2, SEQ))
    ours, theirs = np.asarray(kimi_jax.load(work / "converted")(ids)), hf_logits(ref, ids)
    err = rel(ours, theirs)
    print(f"FP8: max |logit diff| / max |logit| = {err:.2e}")
    assert err < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


def test_fp8_to_bfloat16_rounds_once(fp8_case):
    """In bf16, each weight is the exact float32 product rounded once."""
    work, twin = fp8_case
    kimi_jax.convert(work / "fp8", work / "bf16", progress=False)
    layer = kimi_jax.load(work / "bf16").language_model.layer(0)
    for ours, name in [(layer.mlp.gate_proj, "model.layers.0.mlp.gate_proj.weight"),
                       (layer.self_attn.q_a_proj, "model.layers.0.self_attn.q_a_proj.weight")]:
        expected = twin[name].numpy().T.astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(ours[...]), expected)


# ---------------------------------------------------------------------------- corrupt tensors

EXPERT = "language_model.model.layers.1.mlp.experts.3.up_proj"  # [64, 96]: packed [64, 12], scales [64, 3]
LINEAR = "model.layers.0.mlp.gate_proj"  # FP8 [200, 160]: scale_inv [2, 2]


def _extra_column(t):
    return torch.cat([t, t[:, :1]], dim=1)


def _ignore(name):
    def edit(cfg):
        cfg["text_config"]["quantization_config"]["ignore"].append(name)
    return edit


INT4_CORRUPTIONS = {
    "packed shape": (dict(replace={f"{EXPERT}.weight_packed": lambda t: t[:, :-1]}),
                     rf"tensor {EXPERT}.weight_packed has shape \[64, 11\], expected \[64, 12\]"),
    "scale count": (dict(replace={f"{EXPERT}.weight_scale": _extra_column}),
                    rf"tensor {EXPERT}.weight_scale has shape \[64, 4\], expected \[64, 3\]"),
    "missing scale": (dict(drop=[f"{EXPERT}.weight_scale"]), rf"missing tensor {EXPERT}.weight_scale "),
    "weight_shape": (dict(replace={f"{EXPERT}.weight_shape": lambda t: torch.tensor([64, 128], dtype=t.dtype)}),
                     rf"tensor {EXPERT}.weight_shape is \[64, 128\], expected \[64, 96\] from the config"),
    "packed dtype": (dict(replace={f"{EXPERT}.weight_packed": lambda t: t.long()}),
                     rf"tensor {EXPERT}.weight_packed has dtype I64, expected I32"),
    "float among int4": (dict(drop=[f"{EXPERT}.{p}" for p in ("weight_packed", "weight_scale", "weight_shape")],
                              add={f"{EXPERT}.weight": torch.zeros(64, 96)}),
                         rf"missing tensor {EXPERT}.weight_packed"),
    "unknown part": (dict(add={f"{EXPERT}.weight_zero_point": torch.zeros(64, 3, dtype=torch.int32)}),
                     rf"unexpected tensor {EXPERT}.weight_zero_point"),
    # ignore entries name modules of the text model, without `language_model.`
    "ignored": (dict(config=_ignore("model.layers.1.mlp.experts.3.up_proj")),
                rf"tensor {EXPERT}.weight_packed is quantized, but the quantization_config's ignore list names "
                r"model\.layers\.1\.mlp\.experts\.3\.up_proj"),
    "no config": (dict(config=lambda cfg: cfg["text_config"].pop("quantization_config")),
                  r"tensor language_model\.model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight_packed is INT4 "
                  "pack-quantized, but config.json has no quantization_config"),
}
FP8_CORRUPTIONS = {
    "missing scale_inv": (dict(drop=[f"{LINEAR}.weight_scale_inv"]),
                          rf"tensor {LINEAR}.weight is F8_E4M3 but there is no {LINEAR}.weight_scale_inv"),
    "scale grid": (dict(replace={f"{LINEAR}.weight_scale_inv": lambda t: t[:, :1]}),
                   rf"tensor {LINEAR}.weight_scale_inv is F32 \[2, 1\], expected F32 or BF16 \[2, 2\]"),
    "int4 config": (dict(config=lambda cfg: cfg.update(quantization_config=_k25_quant())),
                    r"tensor model\.layers\.0\.\S+\.weight_scale_inv marks an FP8 block-quantized "
                    "weight, but config.json has a 'compressed-tensors' quantization_config"),
}


def _k25_quant():
    return json.loads((builtin_config_dir("kimi-k2.5") / "config.json").read_text())["text_config"][
        "quantization_config"]


def corrupt(src, dst, *, drop=(), replace=None, add=None, config=None):
    tensors = load_file(src / "model.safetensors")
    for name in drop:
        del tensors[name]
    for name, edit in (replace or {}).items():
        tensors[name] = edit(tensors[name]).contiguous()
    tensors.update(add or {})
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg)
    write_folder(dst, cfg, tensors)
    return dst


@pytest.mark.parametrize("case", sorted(INT4_CORRUPTIONS) + sorted(FP8_CORRUPTIONS))
def test_corrupt_quantized_tensors_are_named(int4_case, fp8_case, case, tmp_path):
    src = int4_case[0] / "int4" if case in INT4_CORRUPTIONS else fp8_case[0] / "fp8"
    edits, message = {**INT4_CORRUPTIONS, **FP8_CORRUPTIONS}[case]
    folder = corrupt(src, tmp_path / "src", **edits)
    with pytest.raises(ConversionError, match=message):
        kimi_jax.convert(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
