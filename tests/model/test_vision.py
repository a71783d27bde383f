"""MoonViT and the projector against Moonshot's reference outputs (golden k25_tiny) and
transformers' Kimi_K25ForConditionalGeneration on a tiny random config."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from kimi_jax.config.model import UnsupportedConfigError, kimi_k25_config
from kimi_jax.model.vision import (
    MoonViT,
    PositionTable,
    VisionConfig,
    as_grids,
    bicubic_matrix,
    encode_media,
    vision_params_from_checkpoint_tree,
)
from kimi_jax.testing.synthetic import (
    k25_config,
    vision_tensor_shapes,
    write_checkpoint,
)

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden" / "k25_tiny"
STAGES = ["patch_proj_out", "patch_embed_out", "block0_out", "block1_out", "final_layernorm_out", "merged", "projected"]


def checkpoint_tree(folder: Path) -> dict:
    """The vision tensors of an official-layout folder, nested at the dots as the converter carries them."""
    tree: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, value in load_file(f).items():
            if name.startswith(("vision_tower.", "mm_projector.")):
                *parents, leaf = name.split(".")
                node = tree
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = value
    return tree


def load_moonvit(folder: Path, dtype=jnp.float32) -> MoonViT:
    """MoonViT with the folder's weights (built abstractly: no random init)."""
    cfg = VisionConfig.from_dict(json.loads((folder / "config.json").read_text())["vision_config"])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoonViT(cfg, dtype=dtype)))
    params = vision_params_from_checkpoint_tree(checkpoint_tree(folder), cfg)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
    return nnx.merge(graphdef, state)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------ golden


@pytest.fixture(scope="module")
def golden():
    model = load_moonvit(GOLDEN)
    inputs, expected = np.load(GOLDEN / "inputs.npz"), np.load(GOLDEN / "expected.npz")
    _, named = encode_media(model, inputs["pixel_values"], inputs["grid_thws"], intermediates=True)
    return model, inputs, expected, named


@pytest.mark.parametrize("stage", STAGES)
def test_golden_stage(golden, stage):
    _, _, expected, named = golden
    want = expected[f"vision_{stage}"]
    assert named[stage].shape == want.shape
    assert rel_err(named[stage], want) < 1e-5


def test_golden_token_counts(golden):
    model, inputs, _, named = golden
    counts = [model.cfg.num_tokens(g) for g in as_grids(inputs["grid_thws"], model.cfg)]
    assert counts == inputs["media_token_counts"].tolist() and sum(counts) == len(named["projected"])


def test_golden_not_the_eager_leak(golden):
    """The reference's eager path lets packed media attend to each other; we must not."""
    _, _, expected, named = golden
    leak = expected["vision_joint_eager_projected"]
    assert np.abs(np.asarray(named["projected"]) - leak).max() > 1e-2


# ----------------------------------------------------------------------- interpolation


@pytest.mark.reference
@pytest.mark.parametrize("table,grid", [((8, 8), (4, 6)), ((8, 8), (12, 10)), ((6, 9), (10, 4)), ((64, 64), (37, 80)),
                                        ((5, 7), (5, 7)), ((4, 3), (1, 2))])
def test_position_table_resize_matches_torch_bicubic(table, grid):
    """Non-square tables and grids, down and up: PyTorch's F.interpolate(bicubic), not jax.image.resize."""
    torch = pytest.importorskip("torch")
    A, B = table
    cfg = VisionConfig.from_dict({**kimi_k25_config().vision_config, "vt_hidden_size": 8, "mm_hidden_size": 8,
                                  "vt_num_attention_heads": 2, "init_pos_emb_height": A, "init_pos_emb_width": B})
    pos = PositionTable(cfg, nnx.Rngs(3), jnp.float32)
    weight = np.asarray(pos.weight[...])
    want = torch.nn.functional.interpolate(
        torch.from_numpy(weight).permute(2, 0, 1)[None], size=grid, mode="bicubic", align_corners=False
    )[0].permute(1, 2, 0).reshape(-1, 8).numpy()
    got = np.asarray(pos((1, *grid)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert bicubic_matrix(A, grid[0]).shape == (grid[0], A)


# ------------------------------------------------------------------------ transformers

TEXT = dict(vocab_size=288, hidden_size=24, intermediate_size=40, moe_intermediate_size=8, num_hidden_layers=1,
            first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
            qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2)
# Square 6 x 6 position table (transformers assumes one); pairwise-distinct sizes.
VISION = dict(vt_hidden_size=48, vt_intermediate_size=40, vt_num_attention_heads=4, vt_num_hidden_layers=2,
              mm_hidden_size=48, init_pos_emb_height=6, init_pos_emb_width=6, init_pos_emb_time=4)
# Smaller than the table, larger, mixed, the table's own size as a 3-frame chunk, a 2-frame chunk.
GRIDS = [(1, 4, 4), (1, 10, 8), (1, 4, 8), (3, 6, 6), (2, 8, 4)]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_reference import hf_kimi_k25

    folder = write_checkpoint(tmp_path_factory.mktemp("k25") / "hf", k25_config(TEXT, VISION), seed=4, dtype="float32")
    hf = hf_kimi_k25(folder)
    ours = load_moonvit(folder)
    n = sum(t * h * w for t, h, w in GRIDS)
    pixels = np.random.default_rng(5).normal(size=(n, 3, 14, 14)).astype(np.float32)
    with torch.no_grad():
        out = hf.model.vision_tower(torch.from_numpy(pixels), grid_thw=torch.tensor(GRIDS))
        want = dict(final_layernorm_out=out.last_hidden_state.numpy(), merged=out.pooler_output.numpy(),
                    projected=hf.model.mm_projector(out.pooler_output).squeeze(1).numpy())
    return ours, pixels, want


@pytest.mark.reference
@pytest.mark.parametrize("stage", ["final_layernorm_out", "merged", "projected"])
def test_transformers_parity(parity, stage):
    ours, pixels, want = parity
    _, named = encode_media(ours, pixels, np.array(GRIDS), intermediates=True)
    assert named[stage].shape == want[stage].shape
    assert rel_err(named[stage], want[stage]) < 1e-5


@pytest.mark.reference
def test_media_never_attend_to_each_other(parity):
    """Perturbing one medium leaves every other medium's features bit-identical, and a medium
    encoded alone gets the features it gets packed with others."""
    ours, pixels, _ = parity

    def encode(px, grids):
        return np.asarray(encode_media(ours, px, grids, intermediates=True)[1]["projected"])

    base = encode(pixels, GRIDS)
    starts = np.cumsum([0] + [t * h * w for t, h, w in GRIDS])
    tokens = np.cumsum([0] + [ours.cfg.num_tokens(g) for g in GRIDS])
    changed = pixels.copy()
    changed[starts[1] : starts[2]] += 1.0
    moved = encode(changed, GRIDS)
    others = np.s_[tokens[1] : tokens[2]]
    assert np.abs(moved[others] - base[others]).max() > 1e-3
    np.testing.assert_array_equal(np.delete(moved, others, 0), np.delete(base, others, 0))
    for i in (0, 3):  # an image and a video chunk
        alone = encode(pixels[starts[i] : starts[i + 1]], [GRIDS[i]])
        np.testing.assert_allclose(alone, base[tokens[i] : tokens[i + 1]], rtol=0, atol=1e-6 * np.abs(base).max())


# ----------------------------------------------------------------- config and weights


def test_real_config():
    cfg = VisionConfig.from_dict(kimi_k25_config().vision_config)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (1152, 27, 16, 72)
    assert (cfg.intermediate_size, cfg.pos_emb_height, cfg.pos_emb_width, cfg.pos_emb_time) == (4304, 64, 64, 4)
    assert (cfg.merge_kernel_size, cfg.merged_size, cfg.text_hidden_size) == ((2, 2), 4608, 7168)
    assert cfg.num_tokens((4, 12, 10)) == 30


@pytest.mark.parametrize("key,value", [("pos_emb_type", "learnable"), ("merge_type", "sd2"),
                                       ("mm_projector_type", "identity"), ("projector_hidden_act", "relu"),
                                       ("video_attn_type", "spatial"), ("mm_hidden_size", 64),
                                       ("vt_num_attention_heads", 5), ("vt_hidden_size", None)])
def test_unsupported_config(key, value):
    d = {**kimi_k25_config().vision_config, key: value}
    with pytest.raises(UnsupportedConfigError, match=key if value is not None else "vt_hidden_size"):
        VisionConfig.from_dict(d)


def test_bad_grids():
    cfg = VisionConfig.from_dict(kimi_k25_config().vision_config)
    assert as_grids(np.array([[1, 4, 6]], np.int64), cfg) == ((1, 4, 6),)
    for bad, match in [([[1, 5, 6]], "divisible"), ([[5, 4, 4]], "init_pos_emb_time"), ([[0, 4, 4]], "positive"),
                       ([1, 4, 4], r"\[M, 3\]"), ([[1.0, 4, 4]], r"\[M, 3\]")]:
        with pytest.raises(ValueError, match=match):
            as_grids(bad, cfg)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda g: as_grids(g, cfg))(jnp.ones((1, 3), jnp.int32))


def test_pixel_values_must_fit_the_grids(golden):
    model, inputs, _, _ = golden
    with pytest.raises(ValueError, match=r"pixel_values has shape \(303, 3, 14, 14\)"):
        model(inputs["pixel_values"][:-1], inputs["grid_thws"])


def test_parameter_tree_follows_checkpoint_names():
    """Every official tensor name is one parameter of the module (indices as ints), and every
    parameter carries logical axes."""
    raw = k25_config(TEXT, VISION)["vision_config"]
    model = nnx.eval_shape(lambda: MoonViT(VisionConfig.from_dict(raw), dtype=jnp.float32))
    params = {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(params) == set(vision_tensor_shapes(raw))
    for name, p in params.items():
        assert len(p.get_metadata()["axes"]) == len(p.shape), name


def test_checkpoint_tree_errors():
    tree = checkpoint_tree(GOLDEN)
    cfg = VisionConfig.from_dict(json.loads((GOLDEN / "config.json").read_text())["vision_config"])
    block = tree["vision_tower"]["encoder"]["blocks"]["0"]
    block["wqkv"]["weight"] = block["wqkv"]["weight"].T
    with pytest.raises(ValueError, match=r"vision_tower\.encoder\.blocks\.0\.wqkv\.weight has shape \(32, 96\)"):
        vision_params_from_checkpoint_tree(tree, cfg)
    del tree["vision_tower"]["encoder"]["blocks"]["1"]
    with pytest.raises(KeyError, match="missing"):
        vision_params_from_checkpoint_tree(tree, cfg)
    with pytest.raises(KeyError, match="mm_projector"):
        vision_params_from_checkpoint_tree({"vision_tower": {}}, cfg)


def test_bfloat16_close_to_float32(golden):
    model, inputs, expected, _ = golden
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoonViT(model.cfg, dtype=jnp.bfloat16)))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model).to_pure_dict()))
    out = encode_media(nnx.merge(graphdef, state), inputs["pixel_values"], inputs["grid_thws"])
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), expected["vision_projected"]) < 5e-2
