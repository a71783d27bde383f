"""Writing a model back in the official Hugging Face layout (safetensors with Moonshot's
tensor names, ``config.json``), so a trained model is a checkpoint like a downloaded one and
``kimi_jax.convert`` reads it.

Each array is the inverse of the converter's transform for it (``kimi_jax.checkpoint.convert``:
``copy``, ``linear``, ``stack``), from the same table, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from kimi_jax.checkpoint.convert import SIDE_FILES, Target, text_targets, vision_targets
from kimi_jax.model.decoder import per_layer
from kimi_jax.parallel.placement import to_host

EXPORT_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def source_tensors(target: Target, value: np.ndarray) -> dict[str, np.ndarray]:
    """The checkpoint tensors (PyTorch layout, float32) that ``target`` is converted from, given its value."""
    value = np.asarray(value, np.float32)
    shape = target.source_shape()
    if target.transform == "copy":
        return {target.sources[0]: value.reshape(shape)}
    if target.transform == "linear":
        out = shape[0]
        return {target.sources[0]: value.reshape(-1, out).T.reshape(shape)}
    if target.transform == "stack":
        return {name: value[e].reshape(shape[1], shape[0]).T for e, name in enumerate(target.sources)}
    raise ValueError(f"{'/'.join(map(str, target.path))}: exporting {target.transform} experts is not supported; "
                     "export a model with dense experts")


def export_hf(model, folder: str | Path, *, dtype: str = "bfloat16", tokenizer: str | Path | None = None,
              shards: int = 1) -> Path:
    """Writes ``model`` (a :class:`~kimi_jax.model.Kimi` with dense experts) to ``folder`` in
    the official layout: ``config.json``, ``model.safetensors`` (or ``shards`` files with an
    index), the router biases in float32 and everything else in ``dtype``; the tokenizer and
    chat-template files of the folder ``tokenizer`` are copied along. Returns the folder."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(EXPORT_DTYPES)}")
    if model.expert_format != "dense":
        raise ValueError(f"exporting {model.expert_format} experts is not supported; export a model with dense experts")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = nnx.state(model).to_pure_dict()
    state["language_model"] = per_layer(config.text, state["language_model"])
    values = traverse_util.flatten_dict(state)
    targets = text_targets(config, np.float32, "language_model.model.", "language_model.lm_head.weight")
    targets += vision_targets(config, np.float32)
    tensors: dict[str, np.ndarray] = {}
    for t in targets:
        for name, array in source_tensors(t, to_host(values[t.path])).items():
            keep32 = name.endswith("e_score_correction_bias")
            # contiguous: safetensors writes an array's buffer as it lies in memory
            tensors[name] = np.ascontiguousarray(array if keep32 else array.astype(EXPORT_DTYPES[dtype]))
    raw = json.loads(config.to_json())
    for block in (raw, raw.get("text_config", {})):  # the weights are written unquantized
        block.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    names = list(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[s * per_shard:(s + 1) * per_shard]}
        save_file(chunk, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, fname))
    if shards > 1:
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        for name in SIDE_FILES:
            src = Path(tokenizer) / name
            if src.is_file() and src.resolve() != (folder / name).resolve():
                shutil.copy2(src, folder / name)
    return folder
