"""Streaming conversion of a Hugging Face checkpoint (PyTorch safetensors) to Orbax.

The target is the model's own parameter tree, built abstractly from ``config.json``; every
target array names the source tensors that fill it and the transform between them:

- ``copy``: same shape (norm scales, the embedding, the router's correction bias);
- ``linear``: a PyTorch ``[out, in]`` matrix transposed to ``[in..., out...]`` and reshaped
  to the target's per-head shape;
- ``stack``: the routed experts' ``linear`` tensors stacked over a leading expert axis.

Before anything is written, the source tensor names and shapes (read from the safetensors
headers) are checked against that table: any unknown tensor, missing tensor or shape
mismatch fails naming the tensor. Then the arrays are built and written a few at a time
(``orbax`` partial saves), so host memory holds about one stacked expert projection at
most. Output goes to a temporary folder that is renamed to the destination on success.

``vision_tower.*`` and ``mm_projector.*`` tensors are carried as they are, under
subtrees of those names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from orbax.checkpoint import v1 as ocp
from safetensors import safe_open
from tqdm.auto import tqdm

from kimi_jax.config import KimiConfig, TextConfig

PARAMS_DIR = "params"
INFO_FILE = "kimi_jax.json"
FORMAT_VERSION = 1
SIDE_FILES = (
    "tiktoken.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
)
MULTIMODAL_PREFIXES = ("vision_tower.", "mm_projector.")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


class ConversionError(ValueError):
    """The source checkpoint does not match what its config describes."""


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


class SafetensorsSource:
    """The tensors of a Hugging Face checkpoint folder: one file, or shards with an index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"source checkpoint folder {self.folder} does not exist")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no 'weight_map'")
            files = sorted({self.folder / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{index} names the shard {f.name}, which does not exist")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.folder}")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            with safe_open(f, framework="numpy") as h:
                for name in h.keys():
                    s = h.get_slice(name)
                    self.tensors[name] = TensorInfo(f, tuple(s.get_shape()), s.get_dtype())
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != fname:
                    raise ConversionError(f"the index maps tensor {name} to {fname}, which does not hold it")
        self._handles: dict[Path, object] = {}

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info.file not in self._handles:
            self._handles[info.file] = safe_open(info.file, framework="numpy")
        return self._handles[info.file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


# ------------------------------------------------------------------------------ table


@dataclasses.dataclass(frozen=True)
class Target:
    """One target array, the source tensors that fill it, and how."""

    path: tuple  # path in the parameter tree, e.g. ("language_model", "layers", 3, "mlp", "gate", "weight")
    shape: tuple[int, ...]
    dtype: jnp.dtype
    transform: str  # "copy" | "linear" | "stack"
    sources: tuple[str, ...]
    n_in: int = 1  # leading target axes that are the matrix's input axes ("linear", "stack")

    def source_shape(self) -> tuple[int, ...]:
        """The shape each source tensor must have."""
        if self.transform == "copy":
            return self.shape
        dims = self.shape[1:] if self.transform == "stack" else self.shape
        return (math.prod(dims[self.n_in :]), math.prod(dims[: self.n_in]))

    def build(self, read) -> np.ndarray:
        """Reads the sources (``read(name) -> np.ndarray``) and assembles the target array."""
        dtype = np.dtype(self.dtype)
        if self.transform == "copy":
            return np.asarray(read(self.sources[0])).astype(dtype).reshape(self.shape)
        if self.transform == "linear":
            return np.asarray(read(self.sources[0])).T.astype(dtype).reshape(self.shape)
        out = np.empty(self.shape, dtype)
        for e, name in enumerate(self.sources):
            out[e] = np.asarray(read(name)).T.astype(dtype).reshape(self.shape[1:])
        return out

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def group(self) -> str:
        """Arrays written together: one call for each layer's small arrays, one per expert stack."""
        if self.transform == "stack":
            return "/".join(map(str, self.path))
        if self.path[:2] == ("language_model", "layers"):
            return f"layer {self.path[2]}"
        return self.path[0]


def _leaf_paths(tree, prefix=()) -> Iterator[tuple[tuple, object]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaf_paths(v, prefix + (k,))
    else:
        yield prefix, tree


def abstract_params(config: KimiConfig, dtype) -> dict:
    """The model's parameter tree as ShapeDtypeStructs (no memory)."""
    from kimi_jax.model import Kimi

    model = nnx.eval_shape(lambda: Kimi(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.state(model).to_pure_dict()


def text_prefixes(names) -> tuple[str, str]:
    """(prefix of decoder tensors, name of the lm_head) in this checkpoint's naming scheme."""
    if any(n.startswith("language_model.") for n in names):
        return "language_model.model.", "language_model.lm_head.weight"
    return "model.", "lm_head.weight"


def text_targets(config: KimiConfig, dtype, prefix: str, head: str) -> list[Target]:
    """Every decoder target array with its source tensors, from the abstract model."""
    targets = []
    tree = abstract_params(config, dtype)["language_model"]
    n_experts = config.text.n_routed_experts
    for path, leaf in _leaf_paths(tree):
        full = ("language_model",) + path
        name = ".".join(map(str, path))
        if path == ("embed_tokens",) or len(leaf.shape) == 1:
            src = prefix + name + ("" if path[-1] == "e_score_correction_bias" else ".weight")
            targets.append(Target(full, leaf.shape, leaf.dtype, "copy", (src,)))
        elif path == ("lm_head",):
            targets.append(Target(full, leaf.shape, leaf.dtype, "linear", (head,)))
        elif len(path) >= 2 and path[-2] == "experts":
            base = prefix + ".".join(map(str, path[:-1]))
            srcs = tuple(f"{base}.{e}.{path[-1]}.weight" for e in range(n_experts))
            targets.append(Target(full, leaf.shape, leaf.dtype, "stack", srcs))
        else:
            src = prefix + name + ("" if name.endswith(".weight") else ".weight")
            targets.append(Target(full, leaf.shape, leaf.dtype, "linear", (src,), 2 if path[-1] == "o_proj" else 1))
    return targets


def multimodal_targets(source: SafetensorsSource, dtype) -> list[Target]:
    """``vision_tower.*`` / ``mm_projector.*`` carried as they are (floats cast to ``dtype``)."""
    targets = []
    for name, info in source.tensors.items():
        if name.startswith(MULTIMODAL_PREFIXES):
            out_dtype = dtype if info.dtype in ("F32", "F16", "BF16") else np.dtype(info.dtype.lower())
            targets.append(Target(tuple(name.split(".")), info.shape, out_dtype, "copy", (name,)))
    return targets


def _skipped(name: str, prefix: str, text: TextConfig) -> bool:
    """Multi-token-prediction layers (after the last decoder layer) are not used for inference."""
    m = re.match(re.escape(prefix) + r"layers\.(\d+)\.", name)
    return bool(m) and text.num_hidden_layers <= int(m.group(1)) < text.num_hidden_layers + text.num_nextn_predict_layers


def plan(config: KimiConfig, source: SafetensorsSource, dtype) -> list[Target]:
    """Checks the source against the config's table and returns the targets to write."""
    names = set(source.tensors)
    quantized = sorted(n for n in names if n.endswith((".weight_packed", ".weight_scale_inv")))
    if quantized:
        raise ConversionError(
            f"quantized tensors (e.g. {quantized[0]}) are not supported yet: INT4 pack-quantized "
            "and FP8 block-quantized checkpoints need the quantized converter"
        )
    prefix, head = text_prefixes(names)
    targets = text_targets(config, dtype, prefix, head) + multimodal_targets(source, dtype)
    expected = {}
    for t in targets:
        for s in t.sources:
            expected[s] = t
    missing = [s for s in expected if s not in names]
    if missing:
        raise ConversionError(
            f"missing tensor {missing[0]} (needed for {'/'.join(map(str, expected[missing[0]].path))})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    unexpected = sorted(n for n in names if n not in expected and not _skipped(n, prefix, config.text))
    if unexpected:
        raise ConversionError(
            f"unexpected tensor {unexpected[0]} in the source: the config describes no such weight"
            + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for name, target in expected.items():
        info = source.tensors[name]
        if info.shape != target.source_shape():
            raise ConversionError(
                f"tensor {name} has shape {list(info.shape)}, expected {list(target.source_shape())} from the config"
            )
        if info.dtype not in ("F32", "F16", "BF16") and target.transform != "copy":
            raise ConversionError(f"tensor {name} has dtype {info.dtype}; expected a float tensor")
    return targets


# ---------------------------------------------------------------------------- writing


def _nest(items: list[tuple[tuple, np.ndarray]]) -> dict:
    tree: dict = {}
    for path, value in items:
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts the Hugging Face checkpoint folder ``src`` to a kimi-jax checkpoint at ``dst``.

    ``dst`` receives ``params/`` (Orbax), ``config.json``, ``kimi_jax.json`` and the
    tokenizer / chat-template / generation / preprocessor files found in ``src``.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    config = KimiConfig.from_file(src)
    source = SafetensorsSource(src)
    targets = plan(config, source, DTYPES[dtype])

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_params(tmp / PARAMS_DIR, targets, source, progress)
        (tmp / "config.json").write_text(config.to_json())
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        info = {"format_version": FORMAT_VERSION, "dtype": dtype, "source": src.name,
                "multimodal": any(t.path[0] != "language_model" for t in targets)}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        source.close()
    return dst


def _write_params(path: Path, targets: list[Target], source: SafetensorsSource, progress: bool) -> None:
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.group, []).append(t)
    total = sum(t.nbytes for t in targets)
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
        for name, group in groups.items():
            bar.set_postfix_str(name)
            items = [(t.path, t.build(source.read)) for t in group]
            ocp.partial.save(path, _nest(items))
            bar.update(sum(t.nbytes for t in group))
            del items
            source.close()  # unmap the shards: their pages would otherwise stay in this process's RSS
    ocp.partial.finalize(path)
