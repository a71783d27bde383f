"""INT4 routed experts kept 4-bit on the device: the golden text_e8_int4 model, both MoE
paths, the footprint (4.5 bits per expert weight) and ``kimi-jax info``."""

import json
import shutil

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kimi_jax
from kimi_jax.checkpoint.summary import (
    bits_per_expert_parameter,
    device_bytes,
    parameter_counts,
)
from kimi_jax.cli.main import main
from kimi_jax.config.model import kimi_k25_config
from kimi_jax.model.moe import Int4Experts, experts_grouped, experts_reference


@pytest.fixture(scope="module")
def golden(fixtures, tmp_path_factory):
    """text_e8_int4 converted twice (float32): experts kept INT4, and dequantized."""
    folder = fixtures / "golden" / "text_e8_int4"
    work = tmp_path_factory.mktemp("golden_int4")
    kimi_jax.convert(folder, work / "int4", dtype="float32", progress=False)
    kimi_jax.convert(folder, work / "dense", dtype="float32", dequantize=True, progress=False)
    return work, dict(np.load(folder / "inputs.npz")), dict(np.load(folder / "expected.npz"))


@pytest.fixture(scope="module")
def int4_model(golden):
    return kimi_jax.load(golden[0] / "int4")


def rel(a, b):
    return np.abs(np.asarray(a) - b).max() / np.abs(b).max()


@pytest.mark.parametrize("impl", ["grouped", "reference"])
@pytest.mark.parametrize("fmt", ["int4", "dense"])
def test_golden_logits(golden, fmt, impl):
    """Expected logits come from Moonshot's code with W = q * scale in float32."""
    work, inputs, expected = golden
    model = kimi_jax.load(work / fmt, moe_impl=impl)
    err = rel(model(inputs["input_ids"]), expected["logits"])
    print(f"text_e8_int4 {fmt} {impl}: max |logit diff| / max |logit| = {err:.2e}")
    assert err < 1e-5


def test_int4_checkpoint_holds_int4(golden, int4_model):
    work, _, _ = golden
    assert json.loads((work / "int4" / "kimi_jax.json").read_text())["expert_format"] == "int4"
    assert json.loads((work / "dense" / "kimi_jax.json").read_text())["expert_format"] == "dense"
    experts = int4_model.language_model.layer(1).mlp.experts
    assert isinstance(experts, Int4Experts)
    assert experts.gate_proj.q.shape == (8, 32, 8) and experts.gate_proj.q.dtype == jnp.uint32  # 8 values a word
    assert experts.gate_proj.scales.shape == (8, 32, 2) and experts.gate_proj.scales.dtype == jnp.bfloat16
    assert experts.down_proj.q.shape == (8, 64, 4) and experts.down_proj.scales.shape == (8, 64, 1)
    # the same weights as the dequantized conversion's [E, in, out]
    dense = kimi_jax.load(work / "dense").language_model.layer(1).mlp.experts
    w = experts.gate_proj.gathered(jnp.arange(8), jnp.float32)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(dense.gate_proj[...]))


# ---------------------------------------------------------------------------- the two paths


@nnx.jit(static_argnums=0)
def _routed(run, moe, x):
    _, idx, _ = moe.gate(x)
    return run(moe.experts, x, idx)


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_grouped_matches_reference(int4_model, tokens):
    """Also with fewer token copies than experts (top-2 of 8: 1 x 2, 3 x 2), where the used experts are gathered."""
    moe = int4_model.language_model.layer(2).mlp
    x = jax.random.normal(jax.random.key(tokens), (tokens, 64))
    a, b = _routed(experts_grouped, moe, x), _routed(experts_reference, moe, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _float_sizes(jaxpr):
    """Sizes of every floating-point value a jaxpr (and the jaxprs inside it) computes."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.size for v in eqn.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _float_sizes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _float_sizes(sub)


@pytest.mark.parametrize("run", [experts_grouped, experts_reference])
def test_decoding_dequantizes_only_the_chosen_experts(int4_model, run):
    """One token, top-2 of 8 experts: no float array larger than two experts' projection appears."""
    graphdef, state = nnx.split(int4_model.language_model.layer(1).mlp)

    def routed(state, x):
        moe = nnx.merge(graphdef, state)
        _, idx, _ = moe.gate(x)
        return run(moe.experts, x, idx)

    jaxpr = jax.make_jaxpr(routed)(state, jnp.ones((1, 64))).jaxpr
    assert max(_float_sizes(jaxpr)) == 2 * 64 * 32  # two experts' [in, out], a quarter of all eight


# ---------------------------------------------------------------------------- footprint


def test_four_and_a_half_bits_per_expert_parameter(golden):
    """4-bit values plus one bf16 scale per 32: 4 + 16 / 32 = 4.5 bits, at K2.5's real size too."""
    work, _, _ = golden
    config = kimi_jax.KimiConfig.from_file(work / "int4")
    assert bits_per_expert_parameter(config, jnp.float32, "int4") == 4.5
    assert bits_per_expert_parameter(config, jnp.float32, "dense") == 32
    k25 = kimi_k25_config()
    sizes, counts = device_bytes(k25, jnp.bfloat16, "int4"), parameter_counts(k25)
    assert 8 * sizes["routed_experts"] / counts["routed_experts"] == 4.5
    assert sizes["attention"] == 2 * counts["attention"]
    model = kimi_jax.load(work / "int4")
    state = [nnx.state(run.mlp.experts) for run in model.language_model.runs if hasattr(run.mlp, "experts")]
    stats = jax.jit(lambda s: s).lower(state).compile().memory_analysis()
    assert stats.argument_size_in_bytes == device_bytes(config, jnp.float32, "int4")["routed_experts"]


def test_info_shows_the_int4_footprint(golden, capsys):
    work, _, _ = golden
    assert main(["info", str(work / "int4")]) == 0
    out = capsys.readouterr().out
    assert "kimi-jax: float32, int4 routed experts" in out
    assert "routed experts  4.50 bits per parameter" in out
    assert "55.30 KB" in out  # 98,304 expert weights x 4.5 bits
    assert main(["info", str(work / "dense")]) == 0
    assert "32.00 bits per parameter" in capsys.readouterr().out


def test_format_2_checkpoints_are_re_laid_at_load(golden, int4_model, tmp_path):
    """Checkpoints converted before the words layout hold int4 values: load packs them."""
    from orbax.checkpoint import v1 as ocp

    from kimi_jax.checkpoint.convert import INFO_FILE, PARAMS_DIR
    from kimi_jax.model.decoder import per_layer
    from kimi_jax.quant.formats import unpack_words

    work, inputs, expected = golden
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", INFO_FILE):
        shutil.copy2(work / "int4" / name, old / name)
    info = json.loads((old / INFO_FILE).read_text())
    (old / INFO_FILE).write_text(json.dumps({**info, "format_version": 2}))
    tree = nnx.state(int4_model).to_pure_dict()
    tree["language_model"] = per_layer(int4_model.config.text, tree["language_model"])  # checkpoints store layers one by one
    tree = jax.tree.map(lambda x: unpack_words(x) if x.dtype == jnp.uint32 else x, tree)
    ocp.save_pytree(old / PARAMS_DIR, tree)
    model = kimi_jax.load(old)
    q = model.language_model.layer(1).mlp.experts.gate_proj.q
    assert q.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(q), np.asarray(int4_model.language_model.layer(1).mlp.experts.gate_proj.q))
    assert rel(model(inputs["input_ids"]), expected["logits"]) < 1e-5
