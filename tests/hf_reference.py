"""transformers' models loaded from official-layout checkpoint folders, independently of
kimi_jax's converter.

DeepseekV3ForCausalLM: the folder's tensors are renamed to the text-only scheme
(``language_model.`` dropped) and transformers applies its own expert conversion.
Kimi_K25ForConditionalGeneration: the folder as it is, its config keys mapped from Moonshot's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def load_hf_text_model(folder: Path, work: Path) -> DeepseekV3ForCausalLM:
    cfg = json.loads((folder / "config.json").read_text())
    text = dict(cfg.get("text_config", cfg))
    for key in ("auto_map", "quantization_config", "architectures"):
        text.pop(key, None)
    text["model_type"] = "deepseek_v3"
    text["dtype"] = "float32"
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(text))
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(f).items():
            if name.startswith(("vision_tower.", "mm_projector.")):
                continue
            tensors[name.removeprefix("language_model.")] = np.asarray(t, np.float32)
    save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        work, config=DeepseekV3Config.from_pretrained(work), dtype=torch.float32, output_loading_info=True,
        attn_implementation="eager",
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def hf_logits(model: DeepseekV3ForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def hf_kimi_k25(folder: Path):
    """transformers' model on an official-layout folder, its config keys mapped from Moonshot's."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    raw = json.loads((folder / "config.json").read_text())
    v = raw["vision_config"]
    text = {k: x for k, x in raw["text_config"].items() if k not in ("auto_map", "architectures")}
    config = Kimi_K25Config(
        text_config={**text, "model_type": "deepseek_v3"},
        vision_config=dict(
            hidden_size=v["vt_hidden_size"], num_hidden_layers=v["vt_num_hidden_layers"],
            num_attention_heads=v["vt_num_attention_heads"], intermediate_size=v["vt_intermediate_size"],
            pos_emb_height=v["init_pos_emb_height"], pos_emb_width=v["init_pos_emb_width"],
            pos_emb_time=v["init_pos_emb_time"], patch_size=v["patch_size"],
            merge_kernel_size=v["merge_kernel_size"],
        ),
        projection_hidden_size=v["mm_hidden_size"], projection_layer_norm_eps=v["projector_ln_eps"],
        image_token_id=raw["media_placeholder_token_id"], tie_word_embeddings=False,
    )
    model, info = Kimi_K25ForConditionalGeneration.from_pretrained(
        folder, config=config, dtype="float32", attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()
