"""Sharded models on 8 CPU devices equal the single-device model: logits and greedy generations."""

import jax
import numpy as np
import pytest

import kimi_jax
from kimi_jax.parallel import shard_model
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

pytestmark = pytest.mark.mesh

MESHES = ["data=1,expert=8,tensor=1", "data=1,expert=4,tensor=2", "data=2,expert=2,tensor=2",
          "data=1,expert=1,tensor=8", "data=8,expert=1,tensor=1"]
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=8, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=16, num_experts_per_tok=2,
            n_group=4, topk_group=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("sharded")
    src = write_checkpoint(work / "hf", k25_config(TEXT, multimodal=False), seed=5, dtype="float32")
    return kimi_jax.convert(src, work / "converted", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = kimi_jax.load(checkpoint)
    ids = np.random.default_rng(0).integers(0, 240, (4, 11))
    prompts = [list(ids[0]), list(ids[1][:4]), list(ids[2][:7])]
    gen = [r.token_ids for r in kimi_jax.generate(model, prompts, max_new_tokens=6, temperature=0.0)]
    return model, ids, np.asarray(model(ids)), prompts, gen


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_load_equals_single_device(checkpoint, reference, mesh):
    _, ids, logits, prompts, gen = reference
    model = kimi_jax.load(checkpoint, mesh=mesh)
    experts = model.language_model.runs[-1].mlp.experts.gate_proj  # [layers, experts, ...]
    layout = model.parallel.layout
    assert experts.addressable_shards[0].data.shape[1] == TEXT["n_routed_experts"] // layout.axis_size("expert")
    assert len(experts.sharding.device_set) == 8
    out = np.asarray(model(ids))
    assert np.abs(out - logits).max() / np.abs(logits).max() < 1e-5
    assert [r.token_ids for r in kimi_jax.generate(model, prompts, max_new_tokens=6, temperature=0.0)] == gen


def test_shard_model_from_a_loaded_model(reference):
    model, ids, logits, _, _ = reference
    sharded = shard_model(model, "cpu-8")
    assert np.abs(np.asarray(sharded(ids)) - logits).max() / np.abs(logits).max() < 1e-5
    assert model.parallel is None  # the original stays on one device
    assert sharded.language_model.runs[-1].mlp.parallel is sharded.parallel


def test_load_onto_a_jax_mesh_and_onto_fewer_devices(checkpoint, reference):
    """A ``jax.sharding.Mesh`` with layout axis names, and a layout over part of the devices."""
    _, ids, logits, prompts, gen = reference
    auto = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    assert kimi_jax.load(checkpoint, mesh=auto).parallel.mesh is auto
    mesh = jax.make_mesh((2, 4), ("data", "expert"))  # jax's default axis types
    model = kimi_jax.load(checkpoint, mesh=mesh)
    assert dict(model.parallel.mesh.shape) == {"data": 2, "expert": 4}
    assert model.parallel.layout.mesh_axes_of("expert") == ("expert",)
    assert np.abs(np.asarray(model(ids)) - logits).max() / np.abs(logits).max() < 1e-5
    assert [r.token_ids for r in kimi_jax.generate(model, prompts, max_new_tokens=6, temperature=0.0)] == gen
    half = kimi_jax.load(checkpoint, mesh="data=1,expert=4,tensor=1", devices=jax.devices()[:4])
    assert len(half.language_model.runs[-1].mlp.experts.gate_proj.sharding.device_set) == 4
    assert np.abs(np.asarray(half(ids)) - logits).max() / np.abs(logits).max() < 1e-5
    with pytest.raises(kimi_jax.parallel.LayoutError, match="not layout axes"):
        kimi_jax.load(checkpoint, mesh=jax.make_mesh((8,), ("model",)))
