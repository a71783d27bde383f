"""The expert-parallel MoE (shard_map + all_to_all) against the single-device one, on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.config.model import KimiConfig
from kimi_jax.model.moe import MoE
from kimi_jax.parallel import Parallel, load_layout
from kimi_jax.testing.synthetic import k25_config

pytestmark = pytest.mark.mesh

MESHES = ["data=1,expert=8,tensor=1", "data=1,expert=4,tensor=2", "data=2,expert=2,tensor=2",
          "data=1,expert=1,tensor=8", "data=8,expert=1,tensor=1"]


def moe_config():
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=80, moe_intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=8, q_lora_rank=16, kv_lora_rank=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=16,
                num_experts_per_tok=3, n_group=4, topk_group=2)
    return KimiConfig.from_dict(k25_config(text, multimodal=False)).text


def shard(cfg, expert_format, seed, parallel):
    """The MoE built with ``seed`` on ``parallel``, its weights placed in the layout's shardings."""
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed), expert_format=expert_format, parallel=parallel)
    graphdef, state = nnx.split(moe)
    shardings = parallel.state_shardings(state)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, state.to_pure_dict(), shardings))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("expert_format", ["dense", "int4"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_expert_parallel_equals_single_device(mesh_spec, expert_format):
    cfg = moe_config()
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), expert_format=expert_format)
    x = jax.random.normal(jax.random.key(0), (3, 7, cfg.hidden_size))  # 21 tokens: padding on every mesh
    ref = np.asarray(moe(x))
    parallel = Parallel.create(mesh_spec)
    sharded = shard(cfg, expert_format, 3, parallel)
    expert_axis = parallel.layout.axis_size("expert")
    shard_shape = sharded.experts.gate_proj.addressable_shards[0].data.shape if expert_format == "dense" else \
        sharded.experts.gate_proj.q.addressable_shards[0].data.shape
    assert shard_shape[0] == cfg.n_routed_experts // expert_axis
    out = np.asarray(nnx.jit(lambda m, x: m(x))(sharded, x))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_experts_not_divisible_by_mesh():
    """12 experts cannot be split over an expert axis of 8: a clear error, not a silent reshard."""
    text = dict(moe_config().__dict__)
    cfg = moe_config().__class__(**{**text, "n_routed_experts": 12, "n_group": 1, "topk_group": 1})
    moe = nnx.eval_shape(lambda: MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    mesh = jax.sharding.AbstractMesh((1, 8, 1), ("data", "expert", "tensor"))
    with pytest.raises(ValueError, match="axis 'expert' of size 12 cannot be split 8 ways"):
        Parallel(mesh, load_layout("data=1,expert=8,tensor=1")).state_shardings(nnx.state(moe))


def test_expert_axes_must_differ_from_batch_axes(tmp_path):
    """Experts split over the batch's mesh axis too would mix data shards: refused, not wrong."""
    f = tmp_path / "overlap.toml"
    f.write_text('[mesh]\ndata = 2\nexpert = 4\ntensor = 1\n[rules]\nbatch = "data"\nexpert = ["expert", "data"]\n')
    cfg = moe_config()
    moe = shard(cfg, "dense", 0, Parallel.create(f))
    x = jnp.ones((4, 3, cfg.hidden_size))
    with pytest.raises(ValueError, match="distinct from the batch's"):
        nnx.jit(lambda m, x: m(x))(moe, x)
