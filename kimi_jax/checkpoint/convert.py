"""Streaming conversion of a Hugging Face checkpoint (PyTorch safetensors) to Orbax.

The target is the model's own parameter tree, built abstractly from ``config.json``; every
target array names the source tensors that fill it and the transform between them:

- ``copy``: same values in order (norm scales, the embedding, the router's correction bias,
  biases reshaped to per-head shapes);
- ``linear``: a PyTorch ``[out, in...]`` weight flattened to [out, in], transposed to
  ``[in..., out...]`` and reshaped to the target's per-head shape;
- ``stack``: the routed experts' ``linear`` tensors stacked over a leading expert axis;
- ``int4``: the routed experts' INT4 tensors stacked as they are (``q``, the checkpoint's
  words as uint32 ``[E, out, in / 8]``, and bfloat16 ``scales`` ``[E, out, in / 32]``, see
  ``kimi_jax.model.moe``).

A linear weight ``X.weight`` may be stored three ways, told apart by the tensors present:
plain float; compressed-tensors ``pack-quantized`` INT4 (``X.weight_packed``,
``X.weight_scale``, ``X.weight_shape``; Kimi K2.5 / K2-Thinking routed experts); or FP8
e4m3 with one ``X.weight_scale_inv`` per 128 x 128 block (DeepSeek-V3 / Kimi K2-Instruct,
every linear of the decoder layers). Quantized tensors are checked against the config's
``quantization_config`` (format, bits, group or block size, symmetry, ignore list).
INT4 routed experts stay 4-bit in the output by default (the ``int4`` expert format,
4.5 bits per weight); with ``dequantize=True`` they are written as dense experts in the
target dtype. FP8 weights, and INT4 weights outside the routed experts, are always
dequantized to the target dtype (W = q * scale computed in float32, rounded once): keeping
FP8 on the device would need FP8 variants of every layer for the older K2-Instruct model,
while dequantizing is simple and exact up to that one rounding.

Before anything is written, the source tensor names, dtypes and shapes (from the
safetensors headers, plus the small ``weight_shape`` tensors) are checked against that
table: any unknown tensor, missing tensor, shape or dtype mismatch fails naming the tensor.
Then the arrays are built and written a few at a time (``orbax`` partial saves), so host
memory holds about one stacked expert projection at most. A SHA-256 of every array's values
is recorded in ``checksums.json`` as it is written (``kimi_jax.checkpoint.verify`` checks
them). Output goes to a temporary folder beside the destination that is swapped in on
success; ``kimi_jax.checkpoint.destination`` has the rules for overwriting and for the
folders a killed conversion leaves.

The vision tower and projector (``vision_tower.*``, ``mm_projector.*``) are written in
MoonViT's own layout too, from the table of ``kimi_jax.model.vision.checkpoint_tensors``, so
``kimi_jax.load`` restores them like every other array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from orbax.checkpoint import v1 as ocp
from tqdm.auto import tqdm

from kimi_jax.checkpoint import destination
from kimi_jax.checkpoint.destination import INFO_FILE, PARAMS_DIR
from kimi_jax.checkpoint.integrity import ALGORITHM, CHECKSUMS_FILE, array_checksum
from kimi_jax.config.model import KimiConfig, TextConfig
from kimi_jax.model.moe import INT4_GROUP_SIZE
from kimi_jax.model.vision import VisionConfig, checkpoint_tensors
from kimi_jax.quant.formats import (
    QuantConfig,
    dequantize_fp8_block,
    dequantize_int4,
    to_device_format,
)

FORMAT_VERSION = 3
"""Version of the written layout. 3: INT4 experts' values as uint32 words (2 held them as
int4; :func:`kimi_jax.load` re-lays those). 2: vision weights in MoonViT's layout (1 carried
them as in the source); text-only checkpoints are the same in 1 and 2."""
SIDE_FILES = (
    "tiktoken.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
FLOAT_DTYPES = ("F32", "F16", "BF16")
INT4_PARTS = ("weight_packed", "weight_scale", "weight_shape")
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


CONVERTER_FILES = {PARAMS_DIR, "config.json", INFO_FILE, CHECKSUMS_FILE, destination.MARKER, *SIDE_FILES}
"""Everything the converter writes into a checkpoint folder (what ``overwrite`` may replace)."""


class ConversionError(ValueError):
    """The source checkpoint does not match what its config describes."""


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F8_E4M3", "I32", ...
    offsets: tuple[int, int]  # byte range in the file


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        start = 8 + n
        return {
            name: TensorInfo(path, tuple(h["shape"]), h["dtype"], tuple(start + o for o in h["data_offsets"]))
            for name, h in header.items()
        }
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConversionError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None


def _check_shard_name(index: Path, tensor: str, fname) -> None:
    """An index entry must name a file inside the checkpoint folder: a relative path without ``..``."""
    if not isinstance(fname, str) or not fname:
        raise ConversionError(f"{index}: the entry for tensor {tensor} is {fname!r}, not a file name")
    if (PurePosixPath(fname).is_absolute() or PureWindowsPath(fname).is_absolute() or PureWindowsPath(fname).drive
            or ".." in PurePosixPath(fname.replace("\\", "/")).parts):
        raise ConversionError(f"{index}: the entry for tensor {tensor} names {fname!r}, which is not a file "
                              "inside the checkpoint folder")


class SafetensorsSource:
    """The tensors of a Hugging Face checkpoint folder: one file, or shards with an index.

    Tensors are read with plain file reads into ``ml_dtypes``-typed arrays, so float8 and
    bfloat16 tensors read like any other (safetensors' numpy loader has no float8, and no
    PyTorch is needed); nothing is memory-mapped, so host memory stays what the converter holds.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"source checkpoint folder {self.folder} does not exist")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no 'weight_map'")
            for name, fname in weight_map.items():
                _check_shard_name(index, name, fname)
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
            self.tensors.update(_read_header(f))
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != fname:
                    raise ConversionError(f"the index maps tensor {name} to {fname}, which does not hold it")
        self._files: dict[Path, BinaryIO] = {}

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name``, read from its file into a new array."""
        info = self.tensors[name]
        if info.dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {name} has dtype {info.dtype}, which kimi-jax cannot read")
        dtype = np.dtype(SAFETENSORS_DTYPES[info.dtype])
        size = info.offsets[1] - info.offsets[0]
        if size != math.prod(info.shape) * dtype.itemsize:
            raise ConversionError(f"tensor {name}: {size} bytes in {info.file.name} cannot hold {info.dtype} "
                                  f"{list(info.shape)}")
        if info.file not in self._files:
            self._files[info.file] = open(info.file, "rb")  # closed by close()
        f = self._files[info.file]
        f.seek(info.offsets[0])
        buf = np.empty(size, np.uint8)
        if f.readinto(memoryview(buf)) != size:
            raise ConversionError(f"tensor {name}: {info.file.name} ends before its data")
        return buf.view(dtype).reshape(info.shape)

    def stored(self, name: str) -> tuple[str, tuple[str, ...]]:
        """How the linear weight ``name`` (``X.weight``) is stored: the encoding and its tensors.

        ``"int4"``: ``X.weight_packed``, ``X.weight_scale``, ``X.weight_shape``; ``"fp8"``:
        ``X.weight`` and ``X.weight_scale_inv``; ``"float"``: ``X.weight``.
        """
        module = name.removesuffix(".weight")
        if f"{module}.weight_packed" in self.tensors:
            return "int4", tuple(f"{module}.{p}" for p in INT4_PARTS)
        if f"{module}.weight_scale_inv" in self.tensors:
            return "fp8", (name, f"{module}.weight_scale_inv")
        return "float", (name,)

    def matrix(self, name: str, quant: QuantConfig | None) -> np.ndarray:
        """The linear weight ``name`` ``[out, in]``; quantized weights dequantized to float32."""
        encoding, parts = self.stored(name)
        module = name.removesuffix(".weight")
        if encoding == "int4":
            packed, scale, shape = (self.read(p) for p in parts)
            return dequantize_int4(packed, scale, shape, quant.group_size, name=module)
        if encoding == "fp8":
            return dequantize_fp8_block(self.read(parts[0]), self.read(parts[1]), quant.block_size, name=module)
        return self.read(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ------------------------------------------------------------------------------ table


@dataclasses.dataclass(frozen=True)
class Target:
    """One target array (for ``int4``: a ``q`` / ``scales`` pair), the source tensors that fill it, and how.

    ``sources`` are tensor names for ``copy`` and linear weight names (``X.weight``, stored
    as :meth:`SafetensorsSource.stored` finds) for the other transforms. ``source_dims`` is
    the source tensor's shape where it is not implied by the target's (the vision tower's
    convolution kernel and flat biases).
    """

    path: tuple  # path in the parameter tree, e.g. ("language_model", "layers", 3, "mlp", "gate", "weight")
    shape: tuple[int, ...]  # for "int4": the shape of q, uint32 words [E, out, in / 8]
    dtype: jnp.dtype
    transform: str  # "copy" | "linear" | "stack" | "int4"
    sources: tuple[str, ...]
    n_in: int = 1  # leading target axes that are the matrix's input axes ("linear", "stack")
    source_dims: tuple[int, ...] | None = None

    def source_shape(self) -> tuple[int, ...]:
        """The shape each source tensor (or, quantized, the weight it stores) must have."""
        if self.source_dims is not None:
            return self.source_dims
        if self.transform == "copy":
            return self.shape
        if self.transform == "int4":
            return (self.shape[1], self.shape[2] * 8)
        dims = self.shape[1:] if self.transform == "stack" else self.shape
        return (math.prod(dims[self.n_in :]), math.prod(dims[: self.n_in]))

    def build(self, source: SafetensorsSource, quant: QuantConfig | None) -> np.ndarray | dict[str, np.ndarray]:
        """Reads the sources and assembles the target array (``int4``: ``{"q", "scales"}``)."""
        dtype = np.dtype(self.dtype)
        if self.transform == "copy":
            return source.read(self.sources[0]).astype(dtype).reshape(self.shape)
        if self.transform == "linear":
            w = source.matrix(self.sources[0], quant)
            return w.reshape(w.shape[0], -1).T.astype(dtype).reshape(self.shape)
        if self.transform == "stack":
            out = np.empty(self.shape, dtype)
            for e, name in enumerate(self.sources):
                out[e] = source.matrix(name, quant).T.astype(dtype).reshape(self.shape[1:])
            return out
        q = np.empty(self.shape, dtype)
        scales = np.empty((*self.shape[:-1], self.shape[-1] * 8 // INT4_GROUP_SIZE), ml_dtypes.bfloat16)
        for e, name in enumerate(self.sources):
            packed, scale, shape = (source.read(p) for p in source.stored(name)[1])
            q[e], scales[e] = to_device_format(packed, scale, shape, INT4_GROUP_SIZE, name=name.removesuffix(".weight"))
        return {"q": q, "scales": scales}

    @property
    def nbytes(self) -> int:
        """Bytes on the device (int4: the words and the bfloat16 scales)."""
        n = math.prod(self.shape)
        if self.transform == "int4":
            return n * 4 + n * 8 // INT4_GROUP_SIZE * 2
        return n * np.dtype(self.dtype).itemsize

    @property
    def group(self) -> str:
        """Arrays written together: one call for each layer's small arrays, one per expert stack."""
        if self.transform in ("stack", "int4"):
            return "/".join(map(str, self.path))
        if self.path[:2] == ("language_model", "layers"):
            return f"layer {self.path[2]}"
        if self.path[:3] == ("vision_tower", "encoder", "blocks"):
            return f"vision block {self.path[3]}"
        return self.path[0]


def abstract_params(config: KimiConfig, dtype, expert_format: str = "dense") -> dict:
    """The checkpoint's parameter tree as ShapeDtypeStructs (no memory): the model's, with
    one ``language_model.layers`` entry per decoder layer (``kimi_jax.model.decoder.per_layer``)."""
    from kimi_jax.model.decoder import per_layer
    from kimi_jax.model.kimi import Kimi

    model = nnx.eval_shape(lambda: Kimi(config, dtype=dtype, rngs=nnx.Rngs(0), expert_format=expert_format))
    params = nnx.state(model).to_pure_dict()
    return {**params, "language_model": per_layer(config.text, params["language_model"])}


def text_prefixes(names) -> tuple[str, str]:
    """(prefix of decoder tensors, name of the lm_head) in this checkpoint's naming scheme."""
    if any(n.startswith("language_model.") for n in names):
        return "language_model.model.", "language_model.lm_head.weight"
    return "model.", "lm_head.weight"


def text_targets(config: KimiConfig, dtype, prefix: str, head: str, expert_format: str = "dense") -> list[Target]:
    """Every decoder target array with its source tensors, from the abstract model."""
    targets = []
    tree = abstract_params(config, dtype, expert_format)["language_model"]
    n_experts = config.text.n_routed_experts
    for path, leaf in traverse_util.flatten_dict(tree).items():
        full = ("language_model",) + path
        name = ".".join(map(str, path))
        if path == ("embed_tokens",) or len(leaf.shape) == 1:
            src = prefix + name + ("" if path[-1] == "e_score_correction_bias" else ".weight")
            targets.append(Target(full, leaf.shape, leaf.dtype, "copy", (src,)))
        elif path == ("lm_head",):
            targets.append(Target(full, leaf.shape, leaf.dtype, "linear", (head,)))
        elif len(path) >= 3 and path[-3] == "experts":  # int4: (..., "experts", proj, "q" | "scales")
            if path[-1] == "q":
                base = prefix + ".".join(map(str, path[:-2]))
                srcs = tuple(f"{base}.{e}.{path[-2]}.weight" for e in range(n_experts))
                targets.append(Target(full[:-1], leaf.shape, leaf.dtype, "int4", srcs))
        elif len(path) >= 2 and path[-2] == "experts":
            base = prefix + ".".join(map(str, path[:-1]))
            srcs = tuple(f"{base}.{e}.{path[-1]}.weight" for e in range(n_experts))
            targets.append(Target(full, leaf.shape, leaf.dtype, "stack", srcs))
        else:
            src = prefix + name + ("" if name.endswith(".weight") else ".weight")
            targets.append(Target(full, leaf.shape, leaf.dtype, "linear", (src,), 2 if path[-1] == "o_proj" else 1))
    return targets


def vision_targets(config: KimiConfig, dtype) -> list[Target]:
    """Every ``vision_tower`` / ``mm_projector`` target array with its source tensor (none for a
    text-only config), from the abstract model and ``checkpoint_tensors``."""
    if not config.is_multimodal:
        return []
    params = abstract_params(config, dtype)
    tensors = checkpoint_tensors(VisionConfig.from_dict(config.vision_config))
    targets = []
    for top in ("vision_tower", "mm_projector"):
        for path, leaf in traverse_util.flatten_dict({top: params[top]}).items():
            t = tensors[path]
            targets.append(Target(path, leaf.shape, leaf.dtype, "linear" if t.linear else "copy", (t.name,),
                                  source_dims=t.shape))
    return targets


def _skipped(name: str, prefix: str, text: TextConfig) -> bool:
    """Multi-token-prediction layers (after the last decoder layer) are not used for inference."""
    m = re.match(re.escape(prefix) + r"layers\.(\d+)\.", name)
    return bool(m) and text.num_hidden_layers <= int(m.group(1)) < text.num_hidden_layers + text.num_nextn_predict_layers


def quant_config(config: KimiConfig) -> QuantConfig | None:
    """The parsed ``quantization_config`` (None without one); unsupported ones raise ``ConversionError``."""
    if not config.quantization_config:
        return None
    try:
        return QuantConfig.from_dict(config.quantization_config)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def expert_format_of(source: SafetensorsSource, dequantize: bool) -> str:
    """``"int4"`` when the routed experts are stored INT4 and are to stay so, else ``"dense"``."""
    int4 = any(re.search(r"\.experts\.\d+\.\w+\.weight_packed$", n) for n in source.tensors)
    return "int4" if int4 and not dequantize else "dense"


def _stored(target: Target, name: str, source: SafetensorsSource) -> tuple[str, tuple[str, ...]]:
    """The encoding and tensor names ``target`` expects for its source ``name``."""
    if target.transform == "copy":
        return "float", (name,)
    if target.transform == "int4":
        module = name.removesuffix(".weight")
        return "int4", tuple(f"{module}.{p}" for p in INT4_PARTS)
    return source.stored(name)


def plan(config: KimiConfig, source: SafetensorsSource, dtype, *, dequantize: bool = False) -> list[Target]:
    """Checks the source against the config's table and returns the targets to write.

    The routed experts get ``int4`` targets when they are stored INT4 and ``dequantize`` is
    false (see :func:`expert_format_of`).
    """
    names = set(source.tensors)
    quant = quant_config(config)
    prefix, head = text_prefixes(names)
    targets = text_targets(config, dtype, prefix, head, expert_format_of(source, dequantize))
    targets += vision_targets(config, dtype)
    expected: dict[str, Target] = {}
    for t in targets:
        for s in t.sources:
            for stored in _stored(t, s, source)[1]:
                expected[stored] = t
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
    for t in targets:
        for name in t.sources:
            encoding, parts = _stored(t, name, source)
            check = {"float": _check_float, "int4": _check_int4, "fp8": _check_fp8}[encoding]
            check(t, name, parts, source, quant)
    return targets


def _check_float(target: Target, name: str, parts, source: SafetensorsSource, quant) -> None:
    info = source.tensors[name]
    if info.shape != target.source_shape():
        raise ConversionError(
            f"tensor {name} has shape {list(info.shape)}, expected {list(target.source_shape())} from the config"
        )
    if target.transform == "copy":
        return
    if info.dtype.startswith("F8"):
        raise ConversionError(f"tensor {name} is {info.dtype} but there is no {name}_scale_inv to dequantize it")
    if info.dtype not in FLOAT_DTYPES:
        raise ConversionError(f"tensor {name} has dtype {info.dtype}; expected a float tensor")


def _check_int4(target: Target, name: str, parts, source: SafetensorsSource, quant: QuantConfig | None) -> None:
    """One INT4 weight against the quantization config and the shape the model config gives it."""
    packed, scale, shape = parts
    module = name.removesuffix(".weight")
    if quant is None or quant.quant_method != "compressed-tensors":
        found = "no quantization_config" if quant is None else f"a {quant.quant_method!r} quantization_config"
        raise ConversionError(f"tensor {packed} is INT4 pack-quantized, but config.json has {found}")
    relative = module.removeprefix("language_model.")  # ignore entries name modules of the text model
    if quant.is_ignored(relative):
        raise ConversionError(
            f"tensor {packed} is quantized, but the quantization_config's ignore list names {relative}"
        )
    out, inp = target.source_shape()
    group = quant.group_size
    if inp % 8 or inp % group:
        raise ConversionError(f"tensor {packed}: in-features {inp} is not a multiple of 8 and of group_size {group}")
    infos = {p: source.tensors[p] for p in parts}
    if infos[shape].dtype not in ("I32", "I64") or infos[shape].shape != (2,):
        raise ConversionError(f"tensor {shape} is {infos[shape].dtype} {list(infos[shape].shape)}, expected 2 integers")
    stored_shape = [int(v) for v in source.read(shape)]
    if stored_shape != [out, inp]:
        raise ConversionError(f"tensor {shape} is {stored_shape}, expected {[out, inp]} from the config")
    for part, dtypes, expected in ((packed, ("I32",), (out, inp // 8)), (scale, FLOAT_DTYPES, (out, inp // group))):
        if infos[part].dtype not in dtypes:
            raise ConversionError(f"tensor {part} has dtype {infos[part].dtype}, expected {' or '.join(dtypes)}")
        if infos[part].shape != expected:
            raise ConversionError(
                f"tensor {part} has shape {list(infos[part].shape)}, expected {list(expected)} "
                f"for weight_shape {[out, inp]} with group_size {group}"
            )
    if target.transform == "int4":
        if group != INT4_GROUP_SIZE:
            raise ConversionError(
                f"tensor {packed}: group_size {group} cannot stay INT4 on the device (only {INT4_GROUP_SIZE}); "
                "convert with --dequantize"
            )
        if infos[scale].dtype != "BF16":
            raise ConversionError(
                f"tensor {scale} is {infos[scale].dtype}: INT4 experts keep bfloat16 scales; convert with --dequantize"
            )


def _check_fp8(target: Target, name: str, parts, source: SafetensorsSource, quant: QuantConfig | None) -> None:
    """One FP8 block-quantized weight against the quantization config and the model config."""
    weight, scale_inv = (source.tensors[p] for p in parts)
    if quant is None or quant.quant_method != "fp8":
        found = "no quantization_config" if quant is None else f"a {quant.quant_method!r} quantization_config"
        raise ConversionError(f"tensor {parts[1]} marks an FP8 block-quantized weight, but config.json has {found}")
    if weight.dtype != "F8_E4M3":
        raise ConversionError(f"tensor {name} has dtype {weight.dtype}, expected F8_E4M3 (it has a weight_scale_inv)")
    if weight.shape != target.source_shape():
        raise ConversionError(
            f"tensor {name} has shape {list(weight.shape)}, expected {list(target.source_shape())} from the config"
        )
    (out, inp), (bo, bi) = weight.shape, quant.block_size
    grid = (-(-out // bo), -(-inp // bi))
    if scale_inv.dtype not in ("F32", "BF16") or scale_inv.shape != grid:
        raise ConversionError(
            f"tensor {parts[1]} is {scale_inv.dtype} {list(scale_inv.shape)}, expected F32 or BF16 {list(grid)} "
            f"(one scale per {bo}x{bi} block of {name} {list(weight.shape)})"
        )


# ---------------------------------------------------------------------------- writing


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "bfloat16",
    dequantize: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts the Hugging Face checkpoint folder ``src`` to a kimi-jax checkpoint at ``dst``.

    ``dst`` receives ``params/`` (Orbax), ``config.json``, ``kimi_jax.json``,
    ``checksums.json`` (a SHA-256 of every array) and the tokenizer / chat-template /
    generation / preprocessor files found in ``src``. INT4 routed experts stay 4-bit unless
    ``dequantize`` (then they are ``dtype``, like every other weight); ``kimi_jax.json``
    records the experts' format for :func:`load`. Paths may be relative or start with ``~``;
    the returned path is absolute.

    ``dst`` must not exist, unless ``overwrite``: then it may be a kimi-jax checkpoint
    (holding only the converter's files) or an empty folder, which is replaced atomically
    (the new checkpoint is completed beside it, then swapped in). Any other folder, a file,
    the source folder itself or a folder inside or around it is refused (``FileExistsError``
    / ``ValueError`` naming the path); see :mod:`kimi_jax.checkpoint.destination`.
    """
    src, dst = destination.absolute(src), destination.absolute(dst)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
    if not dst.is_relative_to(src) and dst != src:
        destination.remove_leftovers(dst)  # first: it may restore a checkpoint an interrupted swap left aside
    destination.check(src, dst, overwrite=overwrite, converter_files=CONVERTER_FILES)
    config = KimiConfig.from_file(src)
    source = SafetensorsSource(src)
    try:
        targets = plan(config, source, DTYPES[dtype], dequantize=dequantize)
        quant = quant_config(config)
        destination.check_writable(dst)
        tmp = destination.make_temporary(dst)
        try:
            checksums = _write_params(tmp / PARAMS_DIR, targets, source, quant, progress)
            (tmp / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": ALGORITHM, "arrays": checksums}, indent=1))
            (tmp / "config.json").write_text(config.to_json())
            for name in SIDE_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            info = {"format_version": FORMAT_VERSION, "dtype": dtype, "source": src.name,
                    "multimodal": any(t.path[0] != "language_model" for t in targets),
                    "expert_format": "int4" if any(t.transform == "int4" for t in targets) else "dense",
                    "checksums": {"algorithm": ALGORITHM, "file": CHECKSUMS_FILE}}
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
            destination.check(src, dst, overwrite=overwrite, converter_files=CONVERTER_FILES)  # changed meanwhile?
            destination.swap_in(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        source.close()
    return dst


def _no_defensive_copy() -> contextlib.AbstractContextManager:
    """The arrays are built for one save only, so Orbax need not copy them before writing
    (an option of newer orbax-checkpoint releases; older ones copy)."""
    if "deepcopy_host_arrays" not in {f.name for f in dataclasses.fields(ocp.options.MemoryOptions)}:
        return contextlib.nullcontext()
    return ocp.Context(memory_options=ocp.options.MemoryOptions(deepcopy_host_arrays=False))


def _write_params(
    path: Path, targets: list[Target], source: SafetensorsSource, quant: QuantConfig | None, progress: bool
) -> dict[str, dict]:
    """Writes the arrays a group at a time; returns the checksum record of each ("/"-joined tree path)."""
    checksums = {}
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.group, []).append(t)
    total = sum(t.nbytes for t in targets)
    with _no_defensive_copy(), tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
        for name, group in groups.items():
            bar.set_postfix_str(name)
            items = [(t.path, t.build(source, quant)) for t in group]
            tree = traverse_util.unflatten_dict(dict(items))
            for leaf_path, array in traverse_util.flatten_dict(tree).items():
                checksums["/".join(map(str, leaf_path))] = array_checksum(array)
            ocp.partial.save(path, tree)
            bar.update(sum(t.nbytes for t in group))
            del items, tree
        ocp.partial.finalize(path)
    return checksums
