"""Mesh layouts: parsing, rule checks, and shardings derived from the model's logical axes."""

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import kimi_jax
from kimi_jax.parallel import LayoutError, Parallel, load_layout, packaged_layouts
from kimi_jax.testing.synthetic import k25_config

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=8, q_lora_rank=24, kv_lora_rank=12,
            qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, n_routed_experts=8,
            num_experts_per_tok=2)


def test_packaged_layouts_parse():
    names = packaged_layouts()
    assert {"cpu-8", "gpu-1", "gpu-2", "gpu-8", "tpu-v5p-64"} <= set(names)
    for name in names:
        layout = load_layout(name)
        assert layout.mesh_axes_of("expert") == ("expert",)
    assert load_layout("gpu-8").size == 8 and load_layout("cpu-8").size == 8


def test_inline_and_file(tmp_path):
    layout = load_layout("data=1,expert=4,tensor=2")
    assert layout.shape == {"data": 1, "expert": 4, "tensor": 2}
    assert layout.spec(("expert", "embed", "expert_mlp")) == P("expert", None, "tensor")
    f = tmp_path / "mine.toml"
    f.write_text('[mesh]\ndata = 2\nexpert = 4\n[rules]\nbatch = "data"\nexpert = ["expert", "data"]\n')
    mine = load_layout(f)
    assert mine.name == "mine" and mine.spec(("expert", "embed")) == P(("expert", "data"), None)


@pytest.mark.parametrize("spec, words", [
    ("nowhere", "no mesh layout 'nowhere'"),
    ("data=1,pipeline=2", "unknown axes"),
])
def test_bad_specs(spec, words):
    with pytest.raises(LayoutError, match=words):
        load_layout(spec)


def test_two_logical_axes_on_one_mesh_axis(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[mesh]\nexpert = 8\n[rules]\nexpert = "expert"\nembed = "expert"\n')
    with pytest.raises(LayoutError, match="'expert' and 'embed' of one array both map to mesh axis 'expert'"):
        load_layout(f).spec(("expert", "embed", "expert_mlp"))
    f.write_text('[mesh]\nexpert = 8\n[rules]\nexpert = "model"\n')
    with pytest.raises(LayoutError, match="names no mesh axis"):
        load_layout(f)


def test_model_shardings_and_divisibility():
    config = kimi_jax.KimiConfig.from_dict(k25_config(TEXT, multimodal=False))
    state = nnx.state(nnx.eval_shape(lambda: kimi_jax.Kimi(config, dtype=jnp.float32)))
    tree = Parallel.create("data=1,expert=4,tensor=2").state_shardings(state)
    runs = tree["language_model"]["runs"]  # the dense layer, then the MoE layers: stacked, the layers axis whole
    assert runs[1]["mlp"]["experts"]["gate_proj"].spec == P(None, "expert", None, "tensor")
    assert runs[0]["self_attn"]["o_proj"].spec == P(None, "tensor", None, None)
    with pytest.raises(LayoutError, match=r"experts/(gate|up|down)_proj: .*'expert' of size 8 cannot be split 16 ways"):
        bad = load_layout("data=1,expert=16,tensor=1")
        Parallel(bad.abstract_mesh(), bad).state_shardings(state)


def test_mesh_needs_matching_device_count():
    with pytest.raises(LayoutError, match="needs 16 devices"):
        load_layout("data=2,expert=8,tensor=1").make_mesh()


def test_scale_groups_split_like_their_values(tmp_path):
    """INT4 scales ("X_groups") must be split like the values' axis X, or shards would not match."""
    f = tmp_path / "mismatch.toml"
    f.write_text('[mesh]\nexpert = 4\ntensor = 2\n[rules]\nexpert_mlp = "expert"\nexpert_mlp_groups = "tensor"\n')
    with pytest.raises(LayoutError, match="'expert_mlp_groups' .* must be split like 'expert_mlp'"):
        load_layout(f)
    f.write_text('[mesh]\nexpert = 4\ntensor = 2\n[rules]\nexpert_mlp = "expert"\nembed = "tensor"\n')
    layout = load_layout(f)  # unnamed group axes follow their values' rules
    assert layout.mesh_axes_of("expert_mlp_groups") == ("expert",)
    assert layout.mesh_axes_of("embed_groups") == ("tensor",)
    f.write_text('[mesh]\nexpert = 8\n[rules]\nexpert = []\nexpert_mlp = "expert"\nexpert_mlp_groups = "expert"\n')
    assert load_layout(f).mesh_axes_of("expert_mlp_groups") == ("expert",)


def test_layouts_extend_the_default_rules():
    """Packaged layouts state only what differs from DEFAULT_RULES."""
    from kimi_jax.parallel import DEFAULT_RULES

    for name in packaged_layouts():
        layout = load_layout(name)
        assert set(dict(layout.rules)) >= set(DEFAULT_RULES)
    assert load_layout("gpu-8").mesh_axes_of("heads") == ("expert",)
    assert load_layout("cpu-8").mesh_axes_of("heads") == ("tensor",)
