"""kimi-jax export: the engine's steps exported with jax.export for CPU, TPU and CUDA on
abstract meshes, and an exported step run again on the CPU against the live one."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kimi_jax
from kimi_jax.config.model import KimiConfig
from kimi_jax.export.loader import ExportedSteps, weights
from kimi_jax.export.steps import EngineShapes, ExportError, export_steps
from kimi_jax.inference.engine import admit_step, decode_step, prefill_step
from kimi_jax.inference.steps import key_block_for
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config, write_checkpoint

SHAPES = EngineShapes(batch=2, max_length=32, prefill_chunk=8, prefill_rows=2, cache_dtype="float32")
ONE = "data=1,expert=1,tensor=1"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    src = write_checkpoint(work / "hf", k25_config(TINY_TEXT, multimodal=False), seed=3, dtype="float32")
    return kimi_jax.convert(src, work / "converted", dtype="float32", progress=False)


def test_exported_steps_equal_the_live_ones(checkpoint, tmp_path):
    """Exported prefill and decode, run on the CPU from the files, equal the engine's jitted steps."""
    model = kimi_jax.load(checkpoint, mesh=ONE, devices=jax.devices()[:1])
    cfg = model.config.text
    manifest = export_steps(model.config, platform="cpu", mesh=ONE, out=tmp_path, shapes=SHAPES,
                            expert_format="dense", dtype="float32", source=str(checkpoint))
    assert set(manifest["steps"]) == {"prefill", "decode"}
    assert json.loads((tmp_path / "manifest.json").read_text())["kernels"]["moe"]["kernel"] == "ragged_dot"
    steps = ExportedSteps(tmp_path)
    w = weights(model)
    slots = steps.new_slots(cfg)
    for slot in (0, 1):  # requests of 10 tokens, sampled at temperature 1 (the keys must match too)
        slots = admit_step(slots, slot, 0, 10, jnp.full((16,), -1, jnp.int32), 1.0, 1.0, 0,
                           jax.random.key_data(jax.random.key(slot)))
    fresh = jax.tree.map(jnp.copy, slots)
    rng = np.random.default_rng(0)
    rows, ids = np.array([0, 1]), rng.integers(0, cfg.vocab_size, (2, 8))
    counts, final = np.array([8, 5]), np.array([True, True])
    exported = steps.prefill(w, slots, rows, ids, counts, final)
    graphdef, state = nnx.split(model.language_model)
    T, P = SHAPES.chunk, SHAPES.rows
    live = prefill_step(graphdef, state, fresh, jnp.asarray(rows, jnp.int32),
                        jnp.asarray(ids, jnp.int32), None, jnp.asarray(counts, jnp.int32), jnp.asarray(final),
                        absorbed=manifest["steps"]["prefill"]["absorbed"],
                        key_block=key_block_for(cfg, P, T, SHAPES.max_length, None))
    np.testing.assert_array_equal(exported[1], live[1])
    for _ in range(3):
        exported = steps.decode(w, exported[0])
        live = decode_step(graphdef, state, live[0], None, key_block=key_block_for(cfg, 2, 1, SHAPES.max_length, None))
        np.testing.assert_array_equal(exported[1], live[1])
        for a, b in zip(jax.tree.leaves(exported[0]), jax.tree.leaves(live[0]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert (np.asarray(exported[0].produced) == 4).all()


def test_k25_exports_for_tpu_from_the_command_line(tmp_path, capsys):
    """The whole K2.5 (61 layers, INT4, abstract) on tpu-v5p-64: the decode step's module holds
    the Mosaic kernel, and the manifest names it for every MoE layer. (Decode only: prefill
    lowers the same layers again; the other TPU layouts export alike, see the README.)"""
    from kimi_jax.cli.main import main

    assert main(["export", "--config", "kimi-k2.5", "--platform", "tpu", "--mesh", "tpu-v5p-64",
                 "--out", str(tmp_path), "--steps", "decode"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["device_kind"] == "TPU v5p" and manifest["mesh"]["axes"] == {"data": 1, "expert": 16, "tensor": 2}
    moe = manifest["kernels"]["moe"]
    assert moe["kernel"] == "pallas-tpu" and moe["layers"] == list(range(1, 61))
    decode = manifest["steps"]["decode"]
    assert decode["custom_calls"].get("tpu_custom_call", 0) >= 1
    assert decode["weights"]["arrays"] >= 30 and decode["weights"]["bytes"] > 5.9e11  # layers stacked; INT4 experts: 594 GB
    assert (tmp_path / "decode.jax_export").stat().st_size == decode["bytes"]
    assert "pallas-tpu" in capsys.readouterr().out


def test_k25_exports_for_cuda_on_gpu_8(tmp_path):
    manifest = export_steps(kimi_jax.kimi_k25_config(), platform="cuda", mesh="gpu-8", out=tmp_path,
                            steps=["decode"])
    assert manifest["kernels"]["moe"]["kernel"] == "pallas"
    calls = manifest["steps"]["decode"]["custom_calls"]
    assert "__gpu$xla.gpu.triton" in calls and "tpu_custom_call" not in calls
    module = jax.export.deserialize(bytearray((tmp_path / "decode.jax_export").read_bytes())).mlir_module()
    for kernel in ("cache_write", "route_top_k"):  # a kernel would see the mesh's whole arrays: XLA's
        assert f'name = "{kernel}"' not in module


def test_clear_errors(tmp_path):
    cfg = KimiConfig.from_dict(k25_config(TINY_TEXT, multimodal=False))
    with pytest.raises(ExportError, match="no path for platform 'tpu'"):
        export_steps(cfg, platform="tpu", mesh="tpu-v5p-64", out=tmp_path, moe_impl="grouped-pallas")
    with pytest.raises(ExportError, match="which TPU is layout"):
        export_steps(cfg, platform="tpu", mesh="gpu-8", out=tmp_path, expert_format="dense")
    with pytest.raises(ExportError, match="unknown platform"):
        export_steps(cfg, platform="metal", mesh="gpu-8", out=tmp_path)
    with pytest.raises(ExportError, match="unknown steps"):
        export_steps(cfg, platform="cpu", mesh="gpu-8", out=tmp_path, steps=["train"])
    with pytest.raises(ExportError, match="exported for tpu"):
        (tmp_path / "manifest.json").write_text(json.dumps({"platform": "tpu", "steps": {}}))
        ExportedSteps(tmp_path)


def test_k25_exports_for_cuda_on_one_gpu(tmp_path):
    """On one GPU the decode step reads every big weight in place: all the Pallas kernels pass
    through the Triton lowering at K2.5's shapes (the PTX is compiled only on a GPU)."""
    manifest = export_steps(kimi_jax.kimi_k25_config(), platform="cuda", mesh="gpu-1", out=tmp_path,
                            steps=["decode"])
    assert manifest["kernels"]["moe"]["kernel"] == "pallas"
    module = jax.export.deserialize(bytearray((tmp_path / "decode.jax_export").read_bytes())).mlir_module()
    kernels = set(re.findall(r'name = "([a-z0-9_]+)"', module))
    assert {"stacked_matmul", "stacked_heads_fold", "stacked_heads_unfold", "mla_decode_split",
            "mla_decode_combine", "cache_write", "route_top_k"} <= kernels
    assert any(k.startswith("int4_grouped_matmul") for k in kernels)
