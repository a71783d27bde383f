"""Tests for kimi_jax.quant.formats: INT4 pack-quantized and FP8 block formats.

Fixtures in tests/fixtures/quant/ come from the golden reference fixtures: every routed-expert
tensor of text_e8_int4/model.safetensors (packed by the compressed-tensors library), the
float originals of layer 1's experts from text_e8/model.safetensors, and text_e8_int4's
``quantization_config``.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import (
    PackedQuantizationCompressor,
)
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import match_name
from safetensors.torch import load_file

from kimi_jax.quant import formats as Q

pytestmark = pytest.mark.reference

FIXTURES = Path(__file__).parents[1] / "fixtures" / "quant"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}


def ct_config() -> dict:
    return json.loads((FIXTURES / "quantization_config.json").read_text())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Torch tensor to numpy, bf16 and float8 kept bit-exact through ml_dtypes."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def random_int4(rng: np.random.Generator, out: int, inp: int, group: int = 32):
    """Random checkpoint-style INT4 tensors: (packed int32, bf16 scales, q int8)."""
    q = rng.integers(-8, 8, size=(out, inp), dtype=np.int8)
    scale = rng.uniform(1e-3, 2e-2, size=(out, inp // group)).astype(ml_dtypes.bfloat16)
    return Q.pack_int4(q), scale, q


# ---------------------------------------------------------------------------- bit layout


def test_pack_hand_computed_words():
    q = np.array(
        [
            [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7],
            [7, -8, 0, 0, 0, 0, 0, -1, -8, -8, -8, -8, -8, -8, -8, -8],
        ],
        dtype=np.int8,
    )
    # stored nibble = q + 8; column 8k + j in bits 4j..4j+3 of word k
    words = np.array([[0x76543210, 0xFEDCBA98], [0x7888880F, 0x00000000]], dtype=np.uint32).view(np.int32)
    np.testing.assert_array_equal(Q.pack_int4(q), words)
    np.testing.assert_array_equal(Q.unpack_int4(words, q.shape), q)
    assert Q.pack_int4(q).dtype == np.int32


@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (3, 4, 96)])
def test_pack_unpack_round_trip(shape):
    q = np.random.default_rng(0).integers(-8, 8, size=shape, dtype=np.int8)
    packed = Q.pack_int4(q)
    assert packed.shape == (*shape[:-1], shape[-1] // 8)
    np.testing.assert_array_equal(Q.unpack_int4(packed, shape), q)


@pytest.mark.parametrize("shape", [(7, 32), (64, 256), (128, 7168 // 16)])
def test_matches_compressed_tensors_packer(shape):
    q = np.random.default_rng(1).integers(-8, 8, size=shape, dtype=np.int8)
    ct_packed = pack_to_int32(torch.from_numpy(q), num_bits=4)
    np.testing.assert_array_equal(Q.pack_int4(q), ct_packed.numpy())
    ct_q = unpack_from_int32(ct_packed, num_bits=4, shape=torch.Size(shape))
    np.testing.assert_array_equal(Q.unpack_int4(ct_packed.numpy(), shape), ct_q.numpy())


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="int8"):
        Q.pack_int4(np.zeros((2, 8), np.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        Q.pack_int4(np.zeros((2, 12), np.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        Q.pack_int4(np.full((2, 8), 8, np.int8))
    with pytest.raises(ValueError, match="does not hold"):
        Q.unpack_int4(np.zeros((2, 3), np.int32), (2, 32))


# ---------------------------------------------------------------------------- golden checkpoint


def golden_int4_modules():
    tensors = load_file(FIXTURES / "experts_int4.safetensors")
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors})
    assert len(prefixes) == 48
    return {p: {k: tensors[f"{p}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")} for p in prefixes}


def test_golden_dequantize_equals_compressed_tensors_decompression():
    cfg = Q.QuantConfig.from_dict(ct_config())
    scheme = QuantizationConfig.model_validate(ct_config()).config_groups["group_0"]
    originals = load_file(FIXTURES / "experts_float_layer1.safetensors")
    for name, sd in golden_int4_modules().items():
        packed, scale, shape = (to_numpy(sd[k]) for k in ("weight_packed", "weight_scale", "weight_shape"))
        assert not cfg.is_ignored(name)
        Q.validate_int4(name, packed, scale, shape, cfg)
        w = Q.dequantize_int4(packed, scale, shape, cfg.group_size, name=name)
        assert w.dtype == np.float32 and w.shape == tuple(shape)
        # compressed-tensors' decompression, exact in float32 when given float32 scales ...
        ct32 = PackedQuantizationCompressor.decompress(dict(sd, weight_scale=sd["weight_scale"].float()), scheme)
        np.testing.assert_array_equal(w, ct32["weight"].numpy())
        # ... and with the stored bf16 scales it is our float32 result rounded once to bf16
        ct16 = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        np.testing.assert_array_equal(w.astype(ml_dtypes.bfloat16), to_numpy(ct16))
        if f"{name}.weight" in originals:
            # the quantization of the float original: within half a step (scale = group max / 7.5),
            # plus, for a group maximum clamped to q = 7, the bf16 rounding of the scale (8 * 2**-8)
            orig = originals[f"{name}.weight"].numpy()
            step = np.repeat(scale.astype(np.float32), cfg.group_size, axis=1)
            assert np.all(np.abs(orig - w) <= (0.5 + 8 * 2**-8) * step)


# ---------------------------------------------------------------------------- config


def test_parse_k25_config_and_ignore_rule():
    d = ct_config()
    cfg = Q.QuantConfig.from_dict(d)
    assert (cfg.quant_method, cfg.num_bits, cfg.group_size, cfg.block_size) == ("compressed-tensors", 4, 32, None)
    assert cfg.ignore == tuple(d["ignore"])
    names = [
        "lm_head",
        "model.lm_head",
        "language_model.lm_head",
        "model.layers.0.self_attn.q_a_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.shared_experts.up_proj",
        "model.layers.1.mlp.experts.3.gate_proj",
        "model.layers.1.mlp.experts.3.down_proj",
        "model.embed_tokens",
        "self_attn",
    ]
    for n in names:
        assert cfg.is_ignored(n) == any(match_name(n, e) for e in d["ignore"]), n
    assert cfg.is_ignored("lm_head") and not cfg.is_ignored("model.lm_head")
    assert cfg.is_ignored("model.layers.0.mlp.down_proj")
    assert not cfg.is_ignored("model.layers.1.mlp.experts.3.down_proj")


def test_parse_fp8_config():
    cfg = Q.QuantConfig.from_dict(FP8_CONFIG)
    assert (cfg.quant_method, cfg.num_bits, cfg.group_size, cfg.block_size) == ("fp8", 8, None, (128, 128))
    assert not cfg.is_ignored("lm_head")


def _with_weights(**changes):
    d = ct_config()
    d["config_groups"]["group_0"]["weights"].update(changes)
    return d


def _with(**changes):
    d = ct_config()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "config, message",
    [
        (_with_weights(symmetric=False), "symmetric"),
        (_with_weights(num_bits=8), "num_bits"),
        (_with_weights(type="float"), "type"),
        (_with_weights(strategy="channel"), "strategy"),
        (_with_weights(actorder="group"), "actorder"),
        (_with_weights(dynamic=True), "dynamic"),
        (_with_weights(group_size=None), "group_size"),
        (_with(format="naive-quantized"), "format"),
        (_with(quantization_status="frozen"), "quantization_status"),
        (_with(config_groups={}), "config_groups"),
        (_with(ignore="lm_head"), "ignore"),
        ({**ct_config(), "quant_method": "gptq"}, "quant_method"),
        ({**FP8_CONFIG, "fmt": "e5m2"}, "fmt"),
        ({**FP8_CONFIG, "activation_scheme": "static"}, "activation_scheme"),
        ({**FP8_CONFIG, "weight_block_size": [128]}, "weight_block_size"),
    ],
)
def test_unsupported_configs_raise(config, message):
    with pytest.raises(ValueError, match=message):
        Q.QuantConfig.from_dict(config)


def test_input_activation_quantization_unsupported():
    d = ct_config()
    d["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    with pytest.raises(ValueError, match="input_activations"):
        Q.QuantConfig.from_dict(d)


# ---------------------------------------------------------------------------- validation

NAME = "model.layers.1.mlp.experts.5.up_proj"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p, s, sh: (p.astype(np.int64), s, sh), "weight_packed has dtype int64"),
        (lambda p, s, sh: (p[:, :-1], s, sh), "weight_packed has shape"),
        (lambda p, s, sh: (p[:-1], s, sh), "weight_packed has shape"),
        (lambda p, s, sh: (p, s[:, :-1], sh), "weight_scale has shape"),
        (lambda p, s, sh: (p, s.astype(np.int32), sh), "weight_scale has dtype"),
        (lambda p, s, sh: (p, s, np.array([16, 64], np.int32)), "weight_packed has shape"),
        (lambda p, s, sh: (p, s, np.array([16, 60], np.int32)), "not a multiple of 8"),
        (lambda p, s, sh: (p, s, np.array([16, 72], np.int32)), "not a multiple of group_size 32"),
        (lambda p, s, sh: (p, s, np.array([16, 64, 1], np.int32)), "weight_shape must be 2 integers"),
    ],
)
def test_validate_int4_names_the_tensor(corrupt, message):
    cfg = Q.QuantConfig.from_dict(ct_config())
    packed, scale, _ = random_int4(np.random.default_rng(2), 32, 64)
    Q.validate_int4(NAME, packed, scale, np.array([32, 64], np.int32), cfg)
    args = corrupt(packed, scale, np.array([32, 64], np.int32))
    with pytest.raises(ValueError, match=message) as err:
        Q.validate_int4(NAME, *args, cfg)
    assert str(err.value).startswith(NAME + ":")
    with pytest.raises(ValueError, match=NAME):
        Q.dequantize_int4(*args, name=NAME)
    with pytest.raises(ValueError, match=NAME):
        Q.to_device_format(*args, name=NAME)


def test_validate_int4_needs_int4_config():
    packed, scale, _ = random_int4(np.random.default_rng(3), 8, 32)
    with pytest.raises(ValueError, match=NAME):
        Q.validate_int4(NAME, packed, scale, (8, 32), Q.QuantConfig.from_dict(FP8_CONFIG))


# ---------------------------------------------------------------------------- device format


def test_to_device_format_and_jax_dequantize_match_numpy():
    rng = np.random.default_rng(4)
    experts = [random_int4(rng, 48, 128) for _ in range(3)]
    dev = [Q.to_device_format(p, s, (48, 128)) for p, s, _ in experts]
    q = jnp.asarray(np.stack([d[0] for d in dev]))
    scales = jnp.asarray(np.stack([d[1] for d in dev]))
    assert q.dtype == jnp.uint32 and q.shape == (3, 48, 16) and scales.dtype == jnp.bfloat16
    ref = np.stack([Q.dequantize_int4(p, s, (48, 128)) for p, s, _ in experts])
    jitted = jax.jit(Q.dequantize, static_argnums=(2, 3))
    np.testing.assert_array_equal(np.asarray(jitted(q, scales, 32, jnp.float32)), ref)
    per_expert = jax.vmap(lambda a, b: Q.dequantize(a, b, 32, jnp.float32))(q, scales)
    np.testing.assert_array_equal(np.asarray(per_expert), ref)
    bf16 = Q.dequantize(q, scales)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16), ref.astype(ml_dtypes.bfloat16))
    # the int4 arrays of format-2 checkpoints dequantize the same, and re-lay to the same words
    as_int4 = jnp.asarray(np.stack([q8 for _, _, q8 in experts]), jnp.int4)
    np.testing.assert_array_equal(np.asarray(Q.dequantize(as_int4, scales, 32, jnp.float32)), ref)
    np.testing.assert_array_equal(np.asarray(Q.pack_words(as_int4)), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(Q.unpack_words(q)).astype(np.int8), np.stack([q8 for _, _, q8 in experts]))


def test_dequantize_rejects_bad_operands():
    q = jnp.zeros((4, 8), jnp.uint32)
    with pytest.raises(ValueError, match="uint32 words or int4"):
        Q.dequantize(jnp.zeros((4, 64), jnp.int8), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="scales shape"):
        Q.dequantize(q, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        Q.int4_matmul(jnp.ones((2, 64)), q[None], jnp.ones((1, 4, 2)))


def test_int4_matmul():
    rng = np.random.default_rng(5)
    packed, scale, _ = random_int4(rng, 40, 96)
    q, s = (jnp.asarray(a) for a in Q.to_device_format(packed, scale, (40, 96)))
    w = Q.dequantize_int4(packed, scale, (40, 96))
    x = rng.standard_normal((2, 5, 96)).astype(np.float32)
    y = jax.jit(Q.int4_matmul)(jnp.asarray(x), q, s)
    assert y.shape == (2, 5, 40) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x @ w.T, rtol=1e-5, atol=1e-6)
    yb = Q.int4_matmul(jnp.asarray(x, jnp.bfloat16), q, s)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), x @ w.T, rtol=2e-2, atol=2e-2)


def test_int4_matmul_vmapped_over_experts():
    rng = np.random.default_rng(6)
    experts = [random_int4(rng, 16, 64) for _ in range(4)]
    q = jnp.asarray(np.stack([Q.to_device_format(p, s, (16, 64))[0] for p, s, _ in experts]))
    s = jnp.asarray(np.stack([s for _, s, _ in experts]))
    x = rng.standard_normal((4, 3, 64)).astype(np.float32)
    y = jax.jit(jax.vmap(Q.int4_matmul))(jnp.asarray(x), q, s)
    ref = np.stack([x[e] @ Q.dequantize_int4(p, sc, (16, 64)).T for e, (p, sc, _) in enumerate(experts)])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)


def test_int4_ragged_dot():
    rng = np.random.default_rng(7)
    experts = [random_int4(rng, 24, 64) for _ in range(3)]
    q = jnp.asarray(np.stack([Q.to_device_format(p, s, (24, 64))[0] for p, s, _ in experts]))
    s = jnp.asarray(np.stack([s for _, s, _ in experts]))
    sizes = np.array([2, 0, 5], np.int32)
    x = rng.standard_normal((7, 64)).astype(np.float32)
    y = jax.jit(Q.int4_ragged_dot)(jnp.asarray(x), q, s, jnp.asarray(sizes))
    owner = np.repeat(np.arange(3), sizes)
    ws = [Q.dequantize_int4(p, sc, (24, 64)) for p, sc, _ in experts]
    ref = np.stack([x[i] @ ws[e].T for i, e in enumerate(owner)])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)


def test_device_words_round_trip_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    packed, scale, qi8 = random_int4(np.random.default_rng(8), 16, 64)
    q, s = (jnp.asarray(a) for a in Q.to_device_format(packed, scale, (16, 64)))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "int4", {"q": q, "scales": s})
    ckpt.wait_until_finished()
    target = {"q": jax.ShapeDtypeStruct(q.shape, jnp.uint32), "scales": jax.ShapeDtypeStruct(s.shape, jnp.bfloat16)}
    restored = ckpt.restore(tmp_path / "int4", target)
    assert restored["q"].dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(Q.unpack_words(restored["q"])).astype(np.int8), qi8)
    w = Q.dequantize(restored["q"], restored["scales"], 32, jnp.float32)
    np.testing.assert_array_equal(np.asarray(w), Q.dequantize_int4(packed, scale, (16, 64)))


# ---------------------------------------------------------------------------- FP8


def torch_fp8_reference(w: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    out, inp = w.shape
    s = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out, :inp]
    return w.to(torch.float32) * s


@pytest.mark.parametrize("shape, block", [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((70, 45), (32, 16))])
def test_fp8_block_dequantize_matches_torch(shape, block):
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale_inv = torch.rand(grid, generator=g) * 1e-2 + 1e-4
    out = Q.dequantize_fp8_block(to_numpy(w), scale_inv.numpy(), block)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(out, torch_fp8_reference(w, scale_inv, block).numpy())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda w, s: (w.astype(np.float32), s), "weight has dtype float32"),
        (lambda w, s: (w[None], s), "2-D"),
        (lambda w, s: (w, s[:, :-1]), r"weight_scale_inv has shape \(3, 1\), expected \(3, 2\)"),
        (lambda w, s: (w, s.astype(np.float16)), "weight_scale_inv has dtype float16"),
    ],
)
def test_fp8_validation_names_the_tensor(corrupt, message):
    name = "model.layers.3.self_attn.q_b_proj"
    w = np.zeros((300, 200), ml_dtypes.float8_e4m3fn)
    s = np.ones((3, 2), np.float32)
    Q.validate_fp8_block(name, w, s)
    with pytest.raises(ValueError, match=message) as err:
        Q.dequantize_fp8_block(*corrupt(w, s), name=name)
    assert str(err.value).startswith(name + ":")
