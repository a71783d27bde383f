"""Converter: layouts it reads, what it writes, and how it fails."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import kimi_jax
from kimi_jax.checkpoint.convert import ocp
from kimi_jax.cli.main import main
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

TEXT = dict(vocab_size=96, hidden_size=40, intermediate_size=72, moe_intermediate_size=20,
            num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=12,
            qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, n_routed_experts=6,
            num_experts_per_tok=2)
VISION = dict(vt_hidden_size=16, vt_intermediate_size=24, vt_num_attention_heads=2, vt_num_hidden_layers=1,
              mm_hidden_size=16, init_pos_emb_height=4, init_pos_emb_width=4)


@pytest.fixture
def hf(tmp_path):
    """A sharded K2.5-layout checkpoint with a vision tower and tokenizer side files."""
    src = write_checkpoint(tmp_path / "hf", k25_config(TEXT, VISION), seed=1, dtype="float32", shards=3)
    (src / "tokenizer_config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    return src


def edit_tensors(folder, fn):
    """Applies ``fn`` to each shard's tensors and rewrites the index to match."""
    weight_map = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(f)
        fn(tensors)
        save_file(tensors, str(f), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f.name))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def first_file(folder):
    return sorted(folder.glob("*.safetensors"))[0]


def test_sharded_k25_with_vision_and_side_files(hf, tmp_path):
    dst = kimi_jax.convert(hf, tmp_path / "out", dtype="float32", progress=False)
    assert (dst / "tokenizer_config.json").is_file() and (dst / "chat_template.jinja").is_file()
    info = json.loads((dst / "kimi_jax.json").read_text())
    assert info["dtype"] == "float32" and info["multimodal"]
    from orbax.checkpoint import v1 as ocp

    tree = ocp.metadata(dst / "params").metadata
    assert set(tree) == {"language_model", "vision_tower", "mm_projector"}
    assert tuple(tree["vision_tower"]["encoder"]["blocks"]["0"]["wqkv"]["weight"].shape) == (16, 3, 2, 8)
    model = kimi_jax.load(dst)
    assert model(np.zeros((1, 5), np.int32)).shape == (1, 5, 96)


def test_bfloat16_default_and_dtype_on_load(hf, tmp_path):
    f32 = kimi_jax.load(kimi_jax.convert(hf, tmp_path / "f32", dtype="float32", progress=False))
    bf16_ckpt = kimi_jax.convert(hf, tmp_path / "bf16", progress=False)
    assert json.loads((bf16_ckpt / "kimi_jax.json").read_text())["dtype"] == "bfloat16"
    assert kimi_jax.load(bf16_ckpt).language_model.embed_tokens.dtype == np.dtype("bfloat16")
    ids = np.arange(12).reshape(2, 6)
    a, b = np.asarray(f32(ids)), np.asarray(kimi_jax.load(bf16_ckpt, dtype="float32")(ids))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_text_only_single_file(tmp_path):
    cfg = k25_config(TEXT, multimodal=False)["text_config"]
    src = write_checkpoint(tmp_path / "hf", cfg, seed=2, dtype="float32", k25_names=False)
    assert (src / "model.safetensors").is_file()
    model = kimi_jax.load(kimi_jax.convert(src, tmp_path / "out", dtype="float32", progress=False))
    assert not model.config.is_multimodal


def test_index_disagreeing_with_shards(hf, tmp_path):
    f = first_file(hf)
    t = load_file(f)
    t.pop(next(iter(t)))
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(kimi_jax.ConversionError, match="which does not hold it"):
        kimi_jax.convert(hf, tmp_path / "out", progress=False)


def test_missing_tensor(hf, tmp_path):
    edit_tensors(hf, lambda t: t.pop("language_model.model.layers.1.mlp.experts.4.up_proj.weight", None))
    with pytest.raises(kimi_jax.ConversionError, match=r"missing tensor .*layers\.1\.mlp\.experts\.4\.up_proj"):
        kimi_jax.convert(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor(hf, tmp_path):
    edit_tensors(hf, lambda t: t.setdefault("language_model.model.layers.0.self_attn.extra_proj.weight",
                                            np.zeros((2, 2), np.float32)))
    with pytest.raises(kimi_jax.ConversionError, match=r"unexpected tensor .*extra_proj"):
        kimi_jax.convert(hf, tmp_path / "out", progress=False)


def test_wrong_shape(hf, tmp_path):
    name = "language_model.model.layers.0.self_attn.kv_b_proj.weight"

    def shrink(t):
        if name in t:
            t[name] = t[name][:-1]

    edit_tensors(hf, shrink)
    with pytest.raises(kimi_jax.ConversionError, match=r"kv_b_proj.weight has shape \[31, 12\], expected \[32, 12\]"):
        kimi_jax.convert(hf, tmp_path / "out", progress=False)


def test_bad_paths(hf, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kimi_jax.convert(tmp_path / "nowhere", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((hf / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        kimi_jax.convert(empty, tmp_path / "out")
    first_file(hf).unlink()
    with pytest.raises(FileNotFoundError, match="names the shard"):
        kimi_jax.convert(hf, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a converted kimi-jax checkpoint"):
        kimi_jax.load(hf)
    with pytest.raises(NotADirectoryError, match="is a file, not a checkpoint folder"):
        kimi_jax.load(hf / "config.json")


def test_existing_destination(hf, tmp_path):
    dst = kimi_jax.convert(hf, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        kimi_jax.convert(hf, dst, progress=False)
    kimi_jax.convert(hf, dst, overwrite=True, dtype="float32", progress=False)
    assert json.loads((dst / "kimi_jax.json").read_text())["dtype"] == "float32"


def test_interrupted_write_leaves_nothing(hf, tmp_path, monkeypatch):
    calls = []
    real_save = ocp.partial.save

    def flaky_save(path, tree):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save(path, tree)

    monkeypatch.setattr(ocp.partial, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        kimi_jax.convert(hf, tmp_path / "out", progress=False)
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli_convert_and_info(hf, tmp_path, capsys):
    assert main(["convert", str(hf), str(tmp_path / "out"), "--quiet"]) == 0
    assert main(["info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "routed_experts" in out and "active / token" in out
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_mesh_checks(hf, tmp_path, capsys):
    """convert --mesh refuses a layout the model cannot be split over, before writing; info --mesh sizes it."""
    assert main(["convert", str(hf), str(tmp_path / "out"), "--quiet", "--mesh", "data=1,expert=4,tensor=1"]) == 2
    assert "axis 'expert' of size 6 cannot be split 4 ways" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(hf), str(tmp_path / "out"), "--quiet", "--mesh", "data=1,expert=2,tensor=1"]) == 0
    assert main(["info", str(tmp_path / "out"), "--mesh", "data=1,expert=2,tensor=1"]) == 0
    assert "of decoder parameters per device" in capsys.readouterr().out
