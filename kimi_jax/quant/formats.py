"""Weight quantization formats of Kimi checkpoints: INT4 routed experts and FP8 blocks.

Host side (numpy, for the converter):

* ``QuantConfig`` parses a ``quantization_config``: compressed-tensors ``pack-quantized``
  (Kimi K2.5: symmetric INT4, one scale per group of input columns) or the DeepSeek-V3 /
  Kimi K2-Instruct FP8 form (e4m3 weights with a ``weight_scale_inv`` per 128x128 block).
* ``pack_int4`` / ``unpack_int4`` / ``dequantize_int4`` / ``validate_int4`` handle the
  compressed-tensors layout: ``weight_packed`` int32 ``[out, in/8]`` holds signed q in
  [-8, 7] as q + 8, column 8k + j of a row in bits 4j..4j+3 of word k; ``weight_scale``
  ``[out, in/group]``; ``weight_shape`` = (out, in); W = q * scale.
* ``dequantize_fp8_block`` / ``validate_fp8_block`` handle the FP8 form.

Device side (JAX): experts stay 4-bit as the checkpoint's own words, ``uint32``
``[..., out, in/8]`` (the int32 ``weight_packed`` reinterpreted, so conversion is a
reinterpretation, not an unpack), with the checkpoint's scales ``[..., out, in/group]``.
``to_device_format`` converts a checkpoint tensor, ``dequantize`` rebuilds W under jit/vmap
(it also accepts ``jnp.int4`` ``[..., out, in]``, the format of checkpoints converted
before), ``int4_matmul`` / ``int4_ragged_dot`` multiply by it. Why the words: the fused
kernel (``kimi_jax.kernels.int4_grouped``) addresses them in 4-byte units, so a K2.5 expert
stack of 2.8 GB stays within 32-bit element offsets (as int4 bytes it does not), and XLA's
dequantize-then-matmul runs as fast on them as on ``jnp.int4``. Measured on an H200 (jax
0.11.2; 16 experts of [2048, 7168], bf16 activations, 1 / 128 / 1024 rows per expert):
int4 0.40 / 0.42 / 0.92 ms, int32 words 0.40 / 0.42 / 0.92 ms, uint8 nibbles 0.68 / 0.70 /
1.19 ms, against 0.11 / 0.14 / 0.64 ms for bf16 weights. In all three the per-group scale
multiply makes XLA write the bf16 W out before the GEMM, so a fused kernel is the way to
faster decoding.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kimi_jax.kernels.grouped import ragged_dot

_NIBBLE_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)
_SCALE_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))
_FP8_SCALE_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """A supported ``quantization_config``.

    ``quant_method`` is ``"compressed-tensors"`` (INT4 pack-quantized, ``num_bits`` 4,
    ``group_size`` set) or ``"fp8"`` (e4m3, ``num_bits`` 8, ``block_size`` set).
    ``ignore`` is compressed-tensors' ignore list (empty for FP8).
    """

    quant_method: str
    num_bits: int
    group_size: int | None = None
    block_size: tuple[int, int] | None = None
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        """Parse a ``quantization_config`` dict; ``ValueError`` for anything unsupported."""
        method = d.get("quant_method")
        if method == "compressed-tensors":
            return cls._from_compressed_tensors(d)
        if method == "fp8":
            return cls._from_fp8(d)
        raise ValueError(
            f"quantization_config: unsupported quant_method {method!r}; "
            "supported: 'compressed-tensors' (pack-quantized INT4) and 'fp8' (block e4m3)"
        )

    @classmethod
    def _from_compressed_tensors(cls, d: Mapping[str, Any]) -> QuantConfig:
        where = "quantization_config"
        if d.get("format") != "pack-quantized":
            raise ValueError(f"{where}: format {d.get('format')!r} is unsupported; only 'pack-quantized'")
        status = d.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"{where}: quantization_status {status!r} is unsupported; only 'compressed'")
        for key in ("kv_cache_scheme", "sparsity_config", "moe_sparsity_config", "transform_config"):
            if d.get(key):
                raise ValueError(f"{where}: {key} is unsupported, got {d[key]!r}")
        groups = d.get("config_groups")
        if not isinstance(groups, Mapping) or not groups:
            raise ValueError(f"{where}: config_groups must be a non-empty mapping, got {groups!r}")
        group_sizes = {_int4_group_size(f"{where}.config_groups.{k}", g) for k, g in groups.items()}
        if len(group_sizes) > 1:
            raise ValueError(f"{where}: config_groups disagree on group_size: {sorted(group_sizes)}")
        ignore = d.get("ignore") or ()
        if not isinstance(ignore, (list, tuple)) or not all(isinstance(e, str) for e in ignore):
            raise ValueError(f"{where}: ignore must be a list of strings, got {ignore!r}")
        return cls("compressed-tensors", 4, group_size=group_sizes.pop(), ignore=tuple(ignore))

    @classmethod
    def _from_fp8(cls, d: Mapping[str, Any]) -> QuantConfig:
        where = "quantization_config"
        if d.get("fmt") != "e4m3":
            raise ValueError(f"{where}: fp8 fmt {d.get('fmt')!r} is unsupported; only 'e4m3'")
        if d.get("activation_scheme") != "dynamic":
            raise ValueError(
                f"{where}: fp8 activation_scheme {d.get('activation_scheme')!r} is unsupported; only 'dynamic'"
            )
        block = d.get("weight_block_size")
        if (
            not isinstance(block, Sequence)
            or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise ValueError(f"{where}: fp8 weight_block_size must be two positive ints, got {block!r}")
        if d.get("modules_to_not_convert"):
            skip = d["modules_to_not_convert"]
            raise ValueError(f"{where}: fp8 modules_to_not_convert is unsupported, got {skip!r}")
        return cls("fp8", 8, block_size=(block[0], block[1]))

    def is_ignored(self, module_name: str) -> bool:
        """Whether an ignore entry names ``module_name``, by compressed-tensors' rule.

        As ``compressed_tensors.utils.match.match_name``: a plain entry must equal the
        name exactly; a ``re:`` entry is a regex applied with ``re.match`` (anchored at
        the start only). Names are relative to the model the config belongs to (in K2.5,
        the text model: no ``language_model.`` prefix). compressed-tensors also matches
        entries against module class names and quantizes only its ``targets`` (``Linear``);
        neither is checked here, so which modules are quantized must come from the
        tensors present (``weight_packed``, ``weight_scale_inv``).
        """
        return any(
            re.match(entry[3:], module_name) is not None if entry.startswith("re:") else entry == module_name
            for entry in self.ignore
        )


def _int4_group_size(where: str, group: Any) -> int:
    """Check one compressed-tensors config group is symmetric INT4 weight-only group quantization."""
    if not isinstance(group, Mapping):
        raise ValueError(f"{where}: expected a scheme mapping, got {group!r}")
    if group.get("format") not in (None, "pack-quantized"):
        raise ValueError(f"{where}: format {group['format']!r} is unsupported; only 'pack-quantized'")
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise ValueError(f"{where}: {key} quantization is unsupported (weight-only INT4 only)")
    w = group.get("weights")
    if not isinstance(w, Mapping):
        raise ValueError(f"{where}: weights scheme missing")
    checks = [
        ("num_bits", w.get("num_bits") == 4, "4"),
        ("type", w.get("type", "int") == "int", "'int'"),
        ("symmetric", w.get("symmetric", True) is True, "true (asymmetric / zero points unsupported)"),
        ("strategy", w.get("strategy") in ("group", None), "'group'"),
        ("dynamic", w.get("dynamic", False) is False, "false"),
        ("block_structure", w.get("block_structure") is None, "null"),
        ("actorder", w.get("actorder") in (None, False, "weight", "static"), "null, 'weight' or 'static'"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"{where}: weights.{key} is {w.get(key)!r}, expected {expected}")
    size = w.get("group_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"{where}: weights.group_size must be a positive int, got {size!r}")
    return size


# ---------------------------------------------------------------------------- INT4 (host)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack int8 q in [-8, 7] ``[..., in]`` into compressed-tensors int32 words ``[..., in/8]``."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise ValueError(f"pack_int4: expected int8 values, got {q.dtype}")
    if q.ndim == 0 or q.shape[-1] % 8:
        raise ValueError(f"pack_int4: last dimension must be a multiple of 8, got shape {q.shape}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    nibbles = (q.astype(np.int32) + 8).astype(np.uint32).reshape(*q.shape[:-1], -1, 8)
    return np.bitwise_or.reduce(nibbles << _NIBBLE_SHIFTS, axis=-1).view(np.int32)


def unpack_int4(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Unpack compressed-tensors int32 words ``[..., in/8]`` to int8 q in [-8, 7] of ``shape``."""
    packed = np.asarray(packed)
    shape = tuple(int(s) for s in shape)
    if packed.dtype != np.int32:
        raise ValueError(f"unpack_int4: expected int32 words, got {packed.dtype}")
    if not shape or shape[-1] % 8 or packed.shape != (*shape[:-1], shape[-1] // 8):
        raise ValueError(f"unpack_int4: packed shape {packed.shape} does not hold int4 values of shape {shape}")
    nibbles = (packed.view(np.uint32)[..., None] >> _NIBBLE_SHIFTS) & 0xF
    return (nibbles.astype(np.int8) - 8).reshape(shape)


def _weight_shape(name: str, shape: Any) -> tuple[int, int]:
    arr = np.asarray(shape)
    if arr.shape != (2,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: weight_shape must be 2 integers, got {shape!r}")
    out, inp = (int(s) for s in arr)
    if out <= 0 or inp <= 0:
        raise ValueError(f"{name}: weight_shape must be positive, got {(out, inp)}")
    return out, inp


def _check_int4(name: str, packed: np.ndarray, scale: np.ndarray, shape: Any, group_size: int) -> tuple[int, int]:
    out, inp = _weight_shape(name, shape)
    if inp % 8:
        raise ValueError(f"{name}: in-features {inp} is not a multiple of 8 (8 int4 values per int32 word)")
    if inp % group_size:
        raise ValueError(f"{name}: in-features {inp} is not a multiple of group_size {group_size}")
    if packed.dtype != np.int32:
        raise ValueError(f"{name}: weight_packed has dtype {packed.dtype}, expected int32")
    if packed.shape != (out, inp // 8):
        raise ValueError(
            f"{name}: weight_packed has shape {packed.shape}, expected {(out, inp // 8)} for weight_shape {(out, inp)}"
        )
    if scale.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{name}: weight_scale has dtype {scale.dtype}, expected bfloat16, float16 or float32")
    if scale.shape != (out, inp // group_size):
        raise ValueError(
            f"{name}: weight_scale has shape {scale.shape}, expected {(out, inp // group_size)} "
            f"(one scale per {group_size} input columns of weight_shape {(out, inp)})"
        )
    return out, inp


def validate_int4(name: str, packed: np.ndarray, scale: np.ndarray, shape: Any, cfg: QuantConfig) -> None:
    """Check one checkpoint INT4 weight (``weight_packed``, ``weight_scale``, ``weight_shape``).

    Raises ``ValueError`` naming ``name`` for a wrong dtype, a packed or scale shape that
    disagrees with ``weight_shape``, or in-features not divisible by 8 or the group size.
    """
    if cfg.quant_method != "compressed-tensors" or cfg.group_size is None:
        raise ValueError(f"{name}: INT4 tensors need a compressed-tensors config, not {cfg.quant_method!r}")
    _check_int4(name, np.asarray(packed), np.asarray(scale), shape, cfg.group_size)


def dequantize_int4(
    packed: np.ndarray, scale: np.ndarray, shape: Any, group_size: int = 32, *, name: str = "weight"
) -> np.ndarray:
    """W = q * scale as float32 ``[out, in]``; exact for bf16/fp16 scales (the product fits float32)."""
    packed, scale = np.asarray(packed), np.asarray(scale)
    out, inp = _check_int4(name, packed, scale, shape, group_size)
    q = unpack_int4(packed, (out, inp)).astype(np.float32).reshape(out, inp // group_size, group_size)
    return (q * scale.astype(np.float32)[..., None]).reshape(out, inp)


def to_device_format(
    packed: np.ndarray, scale: np.ndarray, shape: Any, group_size: int = 32, *, name: str = "weight"
) -> tuple[np.ndarray, np.ndarray]:
    """Checkpoint INT4 tensors -> (the words as ``uint32`` ``[out, in/8]``, the scales unchanged).

    The words are the checkpoint's, reinterpreted (no copy). Stack experts along a new
    leading axis for ``dequantize`` / ``int4_ragged_dot`` and the fused kernel.
    """
    packed, scale = np.asarray(packed), np.asarray(scale)
    _check_int4(name, packed, scale, shape, group_size)
    return packed.view(np.uint32), scale


# ---------------------------------------------------------------------------- INT4 (device)


def unpack_words(words: jax.Array) -> jax.Array:
    """Device words ``uint32 [..., in/8]`` -> ``jnp.int4 [..., in]`` (input 8k + j is nibble j of
    word k, stored as q + 8)."""
    if words.dtype != jnp.uint32:
        raise ValueError(f"unpack_words: expected uint32 words, got {words.dtype}")
    nibbles = (words[..., None] >> jnp.asarray(_NIBBLE_SHIFTS)) & 0xF
    q = nibbles.astype(jnp.int8) - 8
    return q.reshape(*words.shape[:-1], words.shape[-1] * 8).astype(jnp.int4)


def pack_words(q: jax.Array) -> jax.Array:
    """``jnp.int4 [..., in]`` -> device words ``uint32 [..., in/8]`` (inverse of ``unpack_words``);
    re-lays experts of checkpoints converted in the int4 format."""
    if q.dtype != jnp.int4:
        raise ValueError(f"pack_words: expected int4 values, got {q.dtype}")
    if q.shape[-1] % 8:
        raise ValueError(f"pack_words: in-features {q.shape[-1]} must be a multiple of 8")
    words = jnp.zeros((*q.shape[:-1], q.shape[-1] // 8), jnp.uint32)
    for j in range(8):  # strided slices, one elementwise fusion: no [..., in/8, 8] intermediate
        words = words | ((q[..., j::8].astype(jnp.int32) + 8).astype(jnp.uint32) << (4 * j))
    return words


def in_features(q: jax.Array | jax.ShapeDtypeStruct) -> int:
    """Input features of INT4 ``q``: words hold 8 per element, ``jnp.int4`` one."""
    return q.shape[-1] * (8 if q.dtype == jnp.uint32 else 1)


def dequantize(q: jax.Array, scales: jax.Array, group_size: int = 32, dtype: Any = jnp.bfloat16) -> jax.Array:
    """W = q * scale in ``dtype`` ``[..., out, in]``: q words ``uint32 [..., out, in/8]`` (or
    ``jnp.int4 [..., out, in]``), scales ``[..., out, in/group]``.

    Each element is q * scale rounded once to ``dtype``: with bf16 scales, float32 is exact
    and bf16 matches compressed-tensors' own bf16 decompression. Works under jit and vmap.
    """
    if q.dtype == jnp.uint32:
        q = unpack_words(q)
    elif q.dtype != jnp.int4:
        raise ValueError(f"dequantize: q must be uint32 words or int4, got {q.dtype}")
    *lead, out, inp = q.shape
    if inp % group_size or scales.shape != (*lead, out, inp // group_size):
        raise ValueError(
            f"dequantize: scales shape {scales.shape} does not match q {q.shape} with group_size {group_size}"
        )
    groups = q.astype(dtype).reshape(*lead, out, inp // group_size, group_size)
    return (groups * scales.astype(dtype)[..., None]).reshape(q.shape)


def int4_matmul(x: jax.Array, q: jax.Array, scales: jax.Array, group_size: int = 32) -> jax.Array:
    """x ``[..., in]`` @ W.T for W = ``dequantize(q, scales)`` ``[out, in]`` -> ``[..., out]``.

    W is dequantized to x's dtype; the product accumulates in float32 and is returned in
    x's dtype. vmap over a leading experts axis of x, q and scales for per-expert batches.
    """
    if q.ndim != 2:
        raise ValueError(f"int4_matmul: q must be one weight [out, in] (vmap over experts), got {q.shape}")
    w = dequantize(q, scales, group_size, x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def int4_ragged_dot(
    x: jax.Array, q: jax.Array, scales: jax.Array, group_sizes: jax.Array, group_size: int = 32
) -> jax.Array:
    """Rows of x ``[M, in]`` grouped contiguously by expert, each times its expert's W.T.

    q ``[E, out, in]``, scales ``[E, out, in/group]``, ``group_sizes`` ``[E]`` rows per
    expert (as ``jax.lax.ragged_dot``) -> ``[M, out]`` in x's dtype, float32 accumulation.
    Every expert given is dequantized (to one ``[E, out, in]`` array in x's dtype), so pass
    only the experts in use when they are few. The grouped matmul is
    ``kimi_jax.kernels.grouped.ragged_dot`` (tokamax on GPUs and TPUs, XLA elsewhere).
    """
    w = dequantize(q, scales, group_size, x.dtype)
    return ragged_dot(x, jnp.swapaxes(w, 1, 2), group_sizes)


# ---------------------------------------------------------------------------- FP8 blocks (host)


def validate_fp8_block(
    name: str, weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)
) -> None:
    """Check an FP8 weight ``[out, in]`` e4m3fn and its ``weight_scale_inv`` (one per block).

    Raises ``ValueError`` naming ``name`` for a wrong dtype or rank, or a scale grid other
    than ``[ceil(out/block[0]), ceil(in/block[1])]``.
    """
    weight, scale_inv = np.asarray(weight), np.asarray(scale_inv)
    if weight.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
        raise ValueError(f"{name}: weight has dtype {weight.dtype}, expected float8_e4m3fn")
    if weight.ndim != 2:
        raise ValueError(f"{name}: weight must be 2-D [out, in], got shape {weight.shape}")
    if scale_inv.dtype not in _FP8_SCALE_DTYPES:
        raise ValueError(f"{name}: weight_scale_inv has dtype {scale_inv.dtype}, expected float32 or bfloat16")
    (out, inp), (bo, bi) = weight.shape, block
    grid = (-(-out // bo), -(-inp // bi))
    if scale_inv.shape != grid:
        raise ValueError(
            f"{name}: weight_scale_inv has shape {scale_inv.shape}, expected {grid} "
            f"for weight {weight.shape} in {bo}x{bi} blocks"
        )


def dequantize_fp8_block(
    weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128), *, name: str = "weight"
) -> np.ndarray:
    """W = weight * scale_inv of its block, as float32 ``[out, in]``; edge blocks may be partial."""
    validate_fp8_block(name, weight, scale_inv, block)
    weight, scale_inv = np.asarray(weight), np.asarray(scale_inv, dtype=np.float32)
    (out, inp), (bo, bi) = weight.shape, block
    padded = np.pad(weight.astype(np.float32), ((0, -out % bo), (0, -inp % bi)))
    gi, gj = scale_inv.shape
    w = padded.reshape(gi, bo, gj, bi) * scale_inv[:, None, :, None]
    return np.ascontiguousarray(w.reshape(gi * bo, gj * bi)[:out, :inp])
