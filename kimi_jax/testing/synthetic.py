"""Small random models in the official Hugging Face checkpoint layout.

Used by ``kimi-jax demo``, the tests and the benchmarks: they write a ``config.json`` in
Moonshot's K2.5 spelling (shrunk from the real one shipped with the package) and
safetensors files with the official tensor names, exactly as a downloaded checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from kimi_jax.checkpoint.convert import text_targets
from kimi_jax.config.model import KimiConfig, builtin_config_dir

TINY_TEXT = dict(
    vocab_size=512, hidden_size=128, intermediate_size=320, moe_intermediate_size=48,
    num_hidden_layers=3, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=32,
    qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20, n_routed_experts=16,
    num_experts_per_tok=4, n_shared_experts=1, max_position_embeddings=8192,
)
TINY_VISION = dict(
    vt_hidden_size=64, vt_intermediate_size=96, vt_num_attention_heads=4, vt_num_hidden_layers=2,
    mm_hidden_size=64, init_pos_emb_height=16, init_pos_emb_width=16,
)


def k25_config(text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               top: dict[str, Any] | None = None, *, multimodal: bool = True) -> dict[str, Any]:
    """The real K2.5 ``config.json`` with sizes overridden and its INT4 block removed.

    ``text`` / ``vision`` / ``top`` override keys of ``text_config``, ``vision_config`` and
    the top level; with ``multimodal=False`` the vision config is dropped.
    """
    cfg = json.loads((builtin_config_dir("kimi-k2.5") / "config.json").read_text())
    real_vocab = cfg["text_config"]["vocab_size"]
    cfg["text_config"].pop("quantization_config", None)
    cfg["text_config"].update(text or {})
    text_cfg = cfg["text_config"]
    text_cfg["num_key_value_heads"] = text_cfg["num_attention_heads"]
    vocab = text_cfg["vocab_size"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "media_placeholder_token_id"):
        # Special ids keep their distance from the end of the vocabulary.
        if key != "media_placeholder_token_id" and key not in (text or {}):
            text_cfg[key] = vocab - (real_vocab - text_cfg[key])
        cfg[key] = vocab - (real_vocab - cfg[key]) if key not in (text or {}) else text_cfg[key]
    cfg["text_config"]["dtype"] = cfg["dtype"] = "bfloat16"
    if multimodal:
        cfg["vision_config"].update(vision or {})
        cfg["vision_config"]["text_hidden_size"] = cfg["text_config"]["hidden_size"]
    else:
        del cfg["vision_config"]
    cfg.update(top or {})
    return cfg


def vision_tensor_shapes(vision: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Official names and shapes of the MoonViT tower and the patch-merger projector.

    Written from the official layout, independently of the model's own table
    (``kimi_jax.model.vision.checkpoint_tensors``), so the tests can check one against the other.
    """
    H, I = vision["vt_hidden_size"], vision["vt_intermediate_size"]
    p, mm, out = vision["patch_size"], vision["mm_hidden_size"], vision["text_hidden_size"]
    kernel = vision["merge_kernel_size"]
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    merged = mm * kh * kw
    shapes = {
        "vision_tower.patch_embed.proj.weight": (H, 3, p, p),
        "vision_tower.patch_embed.proj.bias": (H,),
        "vision_tower.patch_embed.pos_emb.weight": (vision["init_pos_emb_height"], vision["init_pos_emb_width"], H),
        "vision_tower.encoder.final_layernorm.weight": (H,),
        "vision_tower.encoder.final_layernorm.bias": (H,),
        "mm_projector.pre_norm.weight": (mm,),
        "mm_projector.pre_norm.bias": (mm,),
        "mm_projector.proj.0.weight": (merged, merged),
        "mm_projector.proj.0.bias": (merged,),
        "mm_projector.proj.2.weight": (out, merged),
        "mm_projector.proj.2.bias": (out,),
    }
    for j in range(vision["vt_num_hidden_layers"]):
        b = f"vision_tower.encoder.blocks.{j}."
        shapes.update({
            b + "norm0.weight": (H,), b + "norm0.bias": (H,), b + "norm1.weight": (H,), b + "norm1.bias": (H,),
            b + "wqkv.weight": (3 * H, H), b + "wqkv.bias": (3 * H,), b + "wo.weight": (H, H), b + "wo.bias": (H,),
            b + "mlp.fc0.weight": (I, H), b + "mlp.fc0.bias": (I,), b + "mlp.fc1.weight": (H, I), b + "mlp.fc1.bias": (H,),
        })
    return shapes


def official_tensor_shapes(config: KimiConfig, *, k25_names: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, by official name (bf16/f32 layout)."""
    prefix, head = ("language_model.model.", "language_model.lm_head.weight") if k25_names else ("model.", "lm_head.weight")
    shapes = {}
    for t in text_targets(config, np.float32, prefix, head):
        for name in t.sources:
            shapes[name] = t.source_shape()
    if config.vision_config is not None and k25_names:
        shapes.update(vision_tensor_shapes(config.vision_config))
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator, scale: float) -> np.ndarray:
    """A random tensor whose statistics suit its role (norms near 1, biases small, linears ~1/sqrt(in))."""
    if name.endswith("e_score_correction_bias"):
        return rng.normal(0.0, 0.1, shape).astype(np.float32)
    if len(shape) == 1:
        base = 1.0 if name.endswith(("norm.weight", "layernorm.weight", "norm0.weight", "norm1.weight")) else 0.0
        return (base + 0.1 * rng.normal(size=shape)).astype(np.float32)
    fan_in = math.prod(shape[1:]) if "embed_tokens" not in name and "pos_emb" not in name else 1
    return (scale * rng.normal(size=shape) / math.sqrt(fan_in)).astype(np.float32)


def write_checkpoint(
    folder: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    shards: int = 1,
    k25_names: bool = True,
    scale: float = 1.0,
) -> Path:
    """Writes a random checkpoint of ``config`` in the official layout; returns the folder.

    Tensors are generated shard by shard, so memory stays about one shard.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = KimiConfig.from_dict(config)
    shapes = official_tensor_shapes(cfg, k25_names=k25_names)
    names = list(shapes)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    rng = np.random.default_rng(seed)
    (folder / "config.json").write_text(json.dumps(copy.deepcopy(config), indent=2))
    weight_map = {}
    per_shard = math.ceil(len(names) / shards)
    for s in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {}
        for name in names[s * per_shard : (s + 1) * per_shard]:
            t = random_tensor(name, shapes[name], rng, scale)
            chunk[name] = t if name.endswith("e_score_correction_bias") else t.astype(np_dtype)
            weight_map[name] = fname
        save_file(chunk, str(folder / fname), metadata={"format": "pt"})
        del chunk
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
