"""transformers' DeepseekV3ForCausalLM loaded from an official-layout checkpoint folder.

Independent of kimi_jax's converter: the folder's tensors are renamed to the text-only
scheme (``language_model.`` dropped) and transformers applies its own expert conversion.
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
