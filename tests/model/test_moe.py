"""The grouped (production) MoE path against the per-token reference path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.config.model import KimiConfig
from kimi_jax.model.moe import (
    RANK_TOP_K_MAX_TOKENS,
    MoE,
    experts_grouped,
    experts_reference,
    int4_kernel,
    lowered_int4_kernel,
    select_experts,
    swiglu_grouped,
    top_k_by_rank,
)
from kimi_jax.testing.synthetic import k25_config


def moe_config(**text):
    base = dict(vocab_size=64, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=12,
                num_experts_per_tok=3)
    return KimiConfig.from_dict(k25_config({**base, **text}, multimodal=False)).text


@pytest.mark.parametrize("text", [{}, {"n_group": 4, "topk_group": 2}, {"num_experts_per_tok": 1}])
def test_grouped_equals_reference(text):
    cfg = moe_config(**text)
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (3, 7, cfg.hidden_size))
    moe.set_impl("reference")
    ref = np.asarray(moe(x))
    moe.set_impl("grouped")
    grouped = np.asarray(nnx.jit(lambda m, x: m(x))(moe, x))
    np.testing.assert_allclose(grouped, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_format, impl", [("dense", "grouped"), ("int4", "grouped-xla"),
                                                  ("int4", "grouped-pallas")])
def test_tokens_not_valid_read_no_expert(monkeypatch, expert_format, impl):
    """Idle slots and padding (``valid`` False) are routed to no expert: the grouped matmuls see
    only the real tokens' copies; real tokens are unchanged, the others get the shared expert only."""
    import kimi_jax.model.moe as moe_module

    cfg = moe_config(hidden_size=64, moe_intermediate_size=32)
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), impl=impl, expert_format=expert_format)
    x = jax.random.normal(jax.random.key(0), (4, 2, cfg.hidden_size))
    valid = jnp.array([[True, False], [False, False], [True, True], [False, False]])
    seen = []

    def recorded(w, rows, sizes, kernel, layer=None):
        seen.append(int(np.asarray(sizes).sum()))
        return swiglu_grouped(w, rows, sizes, kernel, layer)

    full = np.asarray(moe(x))
    monkeypatch.setattr(moe_module, "swiglu_grouped", recorded)
    masked = np.asarray(moe(x, valid))
    assert seen == [3 * cfg.num_experts_per_tok]
    keep = np.asarray(valid)
    np.testing.assert_allclose(masked[keep], full[keep], rtol=1e-5, atol=1e-5)
    shared = np.asarray(moe.shared_experts(x))
    np.testing.assert_allclose(masked[~keep], shared[~keep], rtol=1e-5, atol=1e-5)


def test_grouped_handles_skewed_and_empty_groups():
    """All tokens on a few experts (most groups empty): same per-expert outputs."""
    cfg = moe_config()
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (40, cfg.hidden_size))
    idx = jnp.tile(jnp.array([[0, 5, 11]], jnp.int32), (40, 1))
    np.testing.assert_allclose(experts_grouped(moe.experts, x, idx), experts_reference(moe.experts, x, idx),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_paths_agree():
    cfg = moe_config()
    moe = MoE(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(2), (16, cfg.hidden_size), jnp.bfloat16)
    out = np.asarray(moe(x), np.float32)
    moe.set_impl("reference")
    ref = np.asarray(moe(x), np.float32)
    assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown MoE implementation"):
        MoE(moe_config(), dtype=jnp.float32, rngs=nnx.Rngs(0), impl="fast")


def test_int4_experts_are_not_trainable_params():
    """INT4 values and scales are ``Quantized`` variables: optimizers selecting nnx.Param skip them."""
    from kimi_jax.model.layers import Quantized

    cfg = KimiConfig.from_dict(k25_config(None, multimodal=False)).text
    moe = nnx.eval_shape(lambda: MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), expert_format="int4"))
    params = {path for path, _ in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
    quantized = dict(nnx.to_flat_state(nnx.state(moe, Quantized)))
    assert not any("experts" in path for path in params)
    assert set(quantized) == {("experts", p, part) for p in ("gate_proj", "up_proj", "down_proj")
                              for part in ("q", "scales")}
    assert quantized[("experts", "down_proj", "scales")].get_metadata()["axes"] == (
        "expert", "embed", "expert_mlp_groups")
    assert quantized[("experts", "gate_proj", "scales")].get_metadata()["axes"] == (
        "expert", "expert_mlp", "embed_groups")


@pytest.mark.parametrize("impl", ["grouped-xla", "grouped-pallas", "grouped-pallas-tpu"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_int4_grouped_kernels_equal_reference(impl, tokens):
    """The INT4 grouped paths (XLA dequantize + ragged_dot; the fused Triton and Mosaic
    kernels, in interpret mode here) against the per-token reference: decode and prefill."""
    cfg = moe_config(hidden_size=64, moe_intermediate_size=32)
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5), expert_format="int4")
    x = jax.random.normal(jax.random.key(3), (tokens, cfg.hidden_size))
    moe.set_impl("reference")
    ref = np.asarray(moe(x))
    moe.set_impl(impl)
    out = np.asarray(nnx.jit(lambda m, x: m(x))(moe, x))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_grouped_picks_the_kernel_by_platform():
    assert int4_kernel("grouped") == "auto"  # chosen when the step is lowered
    assert [int4_kernel("grouped", p) for p in ("cuda", "rocm", "tpu", "cpu")] == ["pallas", "pallas", "pallas-tpu", "xla"]
    assert int4_kernel("grouped-pallas") == "pallas" and int4_kernel("grouped-xla", "tpu") == "xla"
    assert int4_kernel("grouped-pallas-tpu", "tpu") == "pallas-tpu"
    # the Triton kernel needs power-of-two tiles: these experts fall back to XLA on GPUs
    assert lowered_int4_kernel("grouped", "cuda", 48, 24) == "xla"
    assert lowered_int4_kernel("grouped", "cuda", 7168, 2048) == "pallas"
    assert lowered_int4_kernel("grouped", "tpu", 48, 24) == "pallas-tpu"


@pytest.mark.parametrize("impl, platform", [("grouped-pallas", "tpu"), ("grouped-pallas", "cpu"),
                                            ("grouped-pallas-tpu", "cuda")])
def test_kernel_without_a_path_for_the_platform(impl, platform):
    with pytest.raises(ValueError, match=f"no path for platform '{platform}'"):
        int4_kernel(impl, platform)
    with pytest.raises(ValueError, match="unknown platform"):
        int4_kernel("grouped", "metal")
    with pytest.raises(ValueError, match="no INT4 grouped matmul"):
        int4_kernel("reference")


@pytest.mark.parametrize("platform, call", [("tpu", "tpu_custom_call"), ("cuda", "xla.gpu.triton"),
                                            ("cpu", "ragged_dot")])
def test_one_traced_step_lowers_each_platforms_kernel(platform, call):
    """grouped's choice is made at lowering: the same function exported for TPU holds the
    Mosaic kernel, for CUDA the Triton kernel, for the CPU XLA's ragged_dot."""
    E, D, F, M = 8, 128, 64, 16
    words = {"q": jax.ShapeDtypeStruct((E, F, D // 8), jnp.uint32), "scales": jax.ShapeDtypeStruct((E, F, D // 32), jnp.bfloat16)}
    down = {"q": jax.ShapeDtypeStruct((E, D, F // 8), jnp.uint32), "scales": jax.ShapeDtypeStruct((E, D, F // 32), jnp.bfloat16)}
    w = {"gate_proj": words, "up_proj": words, "down_proj": down}
    args = (w, jax.ShapeDtypeStruct((M, D), jnp.bfloat16), jax.ShapeDtypeStruct((E,), jnp.int32))
    kind = {"tpu": "TPU v5p", "cuda": "NVIDIA H100 80GB HBM3", "cpu": "cpu"}[platform]
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device)):
        exported = jax.export.export(
            jax.jit(lambda w, x, s: swiglu_grouped(w, x, s, "auto")), platforms=(platform,),
            # Triton calls carry no compatibility guarantee across jaxlib versions
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
    text = exported.mlir_module()
    assert call in text
    assert all(other not in text for other in {"tpu_custom_call", "xla.gpu.triton"} - {call})


@pytest.mark.parametrize("impl, tokens", [("grouped", 6), ("grouped-pallas", 6), ("grouped-pallas", 1)])
def test_int4_paths_differentiate_like_the_reference(impl, tokens):
    """Gradients flow through the fused kernels, grouped and per row (to the activations; INT4
    weights are frozen)."""
    cfg = moe_config(hidden_size=64, moe_intermediate_size=32)
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5), expert_format="int4")
    x = jax.random.normal(jax.random.key(4), (tokens, cfg.hidden_size))

    def grad(impl):
        moe.set_impl(impl)
        graphdef, state = nnx.split(moe)
        return jax.grad(lambda x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x))))(x)

    np.testing.assert_allclose(np.asarray(grad(impl)), np.asarray(grad("reference")), rtol=1e-5, atol=1e-6)


def test_one_token_runs_per_row():
    """A decode step of one sequence on the Triton kernel runs per row: no sort or group
    sizes, the same output as the reference; an idle token (``valid`` False) reads no expert."""
    cfg = moe_config(hidden_size=64, moe_intermediate_size=32)
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(6), expert_format="int4", impl="grouped-pallas")
    x = jax.random.normal(jax.random.key(5), (1, cfg.hidden_size))
    text = str(jax.make_jaxpr(lambda x: moe(x))(x))
    assert "int4_rows_matmul" in text and "int4_grouped_matmul" not in text
    out = np.asarray(moe(x))
    moe.set_impl("reference")
    np.testing.assert_allclose(out, np.asarray(moe(x)), rtol=1e-5, atol=1e-5)
    moe.set_impl("grouped-pallas")
    np.testing.assert_allclose(np.asarray(moe(x, jnp.array([False]))), np.asarray(moe.shared_experts(x)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
def test_one_token_lowers_per_row_on_gpus_only(platform):
    """``grouped`` (auto) at one token: the per-row Triton kernel where it runs compiled, the
    grouped XLA path elsewhere."""
    cfg = moe_config(hidden_size=128, moe_intermediate_size=64, n_routed_experts=8)
    moe = nnx.eval_shape(lambda: MoE(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), expert_format="int4"))
    graphdef, state = nnx.split(moe)
    kind = {"cuda": "NVIDIA H100 80GB HBM3", "cpu": "cpu"}[platform]
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).trace(
            state, jax.ShapeDtypeStruct((1, 128), jnp.bfloat16)).lower(lowering_platforms=(platform,)).as_text()
    assert ("int4_rows_matmul" in text) == (platform == "cuda")
    assert "int4_grouped_matmul" not in text and ("xla.gpu.triton" in text) == (platform == "cuda")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_top_k_by_rank_equals_lax_top_k(dtype):
    """Ranks counted give lax.top_k's indices, in its order: ties to the lower index, -0 below
    +0, NaN above inf (so always distinct ids in range)."""
    values = jnp.round(jax.random.normal(jax.random.key(0), (7, 3, 96)) * 3) / 3  # many ties
    specials = jnp.array([1.0, jnp.nan, -0.0, 0.0, jnp.inf, -jnp.inf, 2.0, -jnp.nan, 2.0, 0.0])
    for v, k in ((values, 8), (values, 1), (values[0, 0, :16], 16), (specials, 10), (specials, 3)):
        v = v.astype(dtype)
        np.testing.assert_array_equal(np.asarray(top_k_by_rank(v, k)), np.asarray(jax.lax.top_k(v, k)[1]))


def test_router_counts_ranks_for_decode_steps_only():
    """Up to RANK_TOP_K_MAX_TOKENS tokens the router counts ranks (no sort in the step), past
    them it sorts; both choose the same experts with the same weights."""
    cfg = moe_config(n_routed_experts=32, num_experts_per_tok=4)
    bias = jax.random.normal(jax.random.key(1), (32,)) * 0.1
    many = jax.nn.sigmoid(jax.random.normal(jax.random.key(2), (RANK_TOP_K_MAX_TOKENS + 1, 32)))
    for scores in (many[:1], many[:RANK_TOP_K_MAX_TOKENS], many):
        jaxpr = str(jax.make_jaxpr(lambda s: select_experts(s, bias, cfg))(scores))
        assert ("top_k" in jaxpr) == (scores.shape[0] > RANK_TOP_K_MAX_TOKENS)
        weights, idx = select_experts(scores, bias, cfg)
        expected = jax.lax.top_k(scores + bias, 4)[1]
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(expected))
        np.testing.assert_allclose(np.asarray(weights), np.asarray(expected_weights(scores, expected, cfg)), rtol=1e-6)


def expected_weights(scores, idx, cfg):
    w = jnp.take_along_axis(scores, idx, axis=-1)
    return w / (w.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
