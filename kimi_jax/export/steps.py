"""The serving engine's compiled steps exported with ``jax.export`` for a platform and mesh.

:func:`export_steps` traces the engine's own ``decode_step`` / ``prefill_step``
(``kimi_jax.inference.engine``) over abstract weights at their real sizes and an abstract
mesh of the target's shape (``jax.sharding.AbstractMesh``, with an abstract device naming
the chip: Mosaic and Triton lower for a named generation), lowers them for ``tpu``,
``cuda`` or ``cpu`` on this machine, and writes each serialized step plus ``manifest.json``:
input and output shapes, dtypes and shardings, the platform, chip and mesh, the engine's
shapes, the INT4 kernel of each MoE layer and the custom calls found in each module, and
the versions that produced them. Nothing is allocated: a 1T-parameter model exports on a
laptop.

The weights enter a step as the pure dict of the language model's state
(``nnx.state(model.language_model).to_pure_dict()``) and the engine's :class:`SlotState`,
so an artifact runs with nothing but JAX (:mod:`kimi_jax.export.loader`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform as host_platform
import re
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import flatbuffers  # noqa: F401 - Exported.serialize needs it: a missing one fails here, not after lowering
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import (
    AbstractDevice,
    AbstractMesh,
    AxisType,
    NamedSharding,
    PartitionSpec,
)

from kimi_jax.config.model import KimiConfig
from kimi_jax.inference.engine import SlotState, decode_step, prefill_step
from kimi_jax.inference.steps import key_block_for
from kimi_jax.model.cache import KVCache
from kimi_jax.model.kimi import Kimi
from kimi_jax.model.mla import absorbed_is_cheaper
from kimi_jax.model.moe import INT4_KERNELS, int4_kernel, lowered_int4_kernel
from kimi_jax.parallel.layout import Layout, load_layout
from kimi_jax.parallel.placement import Parallel

PLATFORMS = ("tpu", "cuda", "cpu")
STEPS = ("prefill", "decode")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TRITON_CALL = "__gpu$xla.gpu.triton"
"""The custom call of Pallas Triton kernels: no compatibility guarantee across jaxlib versions,
so a CUDA artifact holding it runs only under the jaxlib that exported it (the manifest says which)."""
MOSAIC_GPU_CALL = "mosaic_gpu_v2"
"""tokamax's Mosaic GPU kernels (dense experts, in a step traced on a GPU host): the same caveat."""
CUSTOM_CALLS = {"tpu_custom_call": "Pallas Mosaic (TPU) kernel", TRITON_CALL: "Pallas Triton (GPU) kernel"}
_TPU_CHIPS = {"v4": "TPU v4", "v5e": "TPU v5e", "v5p": "TPU v5p", "v6e": "TPU v6e"}
_DEFAULT_KINDS = {"cuda": "NVIDIA H200", "cpu": "cpu"}


class ExportError(ValueError):
    """A step that cannot be exported as asked (platform, chip, kernel or shape)."""


def device_kind_for(platform: str, layout: Layout, device_kind: str | None = None) -> str:
    """The chip a step is lowered for: ``device_kind`` if given, else from a TPU layout's name
    (``tpu-v5p-64`` -> ``TPU v5p``), an H200 for ``cuda`` (any Hopper lowers alike), ``cpu``."""
    if device_kind is not None:
        return device_kind
    if platform == "tpu":
        m = re.match(r"tpu-(v\w+?)-\d+$", layout.name)
        if m is None or m.group(1) not in _TPU_CHIPS:
            raise ExportError(
                f"which TPU is layout {layout.name!r} for? Mosaic kernels lower for a named generation: pass "
                f"--device-kind (e.g. 'TPU v5p'), or use a layout named tpu-<chip>-<chips> with a chip of "
                f"{sorted(_TPU_CHIPS)}"
            )
        return _TPU_CHIPS[m.group(1)]
    return _DEFAULT_KINDS[platform]


def target_mesh(layout: Layout, platform: str, device_kind: str) -> AbstractMesh:
    """The layout's mesh without devices, its device naming the target chip."""
    device = AbstractDevice(device_kind=device_kind, num_cores=1 if platform != "cpu" else None,
                            platform=platform)
    return AbstractMesh(tuple(n for _, n in layout.axes), tuple(a for a, _ in layout.axes),
                        (AxisType.Auto,) * len(layout.axes), abstract_device=device)


@dataclasses.dataclass(frozen=True)
class EngineShapes:
    """The shapes an engine compiles its steps for (as ``kimi_jax.Engine`` takes them)."""

    batch: int = 8
    max_length: int = 4096
    prefill_chunk: int = 256
    prefill_rows: int = 4
    cache_dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("batch", "max_length", "prefill_chunk", "prefill_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ExportError(f"{name} must be a positive int, got {value!r}")

    @property
    def chunk(self) -> int:
        return min(self.prefill_chunk, self.max_length)

    @property
    def rows(self) -> int:
        return min(self.prefill_rows, self.batch)


def _abstract_model(config: KimiConfig, parallel: Parallel, expert_format: str, dtype, moe_impl: str) -> nnx.Module:
    return nnx.eval_shape(lambda: Kimi(config, dtype=dtype, rngs=nnx.Rngs(0), moe_impl=moe_impl,
                                       expert_format=expert_format, parallel=parallel))


def _batch_spec(parallel: Parallel, shape: tuple[int, ...]) -> PartitionSpec:
    """As ``Parallel.place_batch``: the leading axis over the batch axes where it splits evenly."""
    axes = parallel.layout.mesh_axes_of("batch")
    ways = math.prod(parallel.layout.axis_size(a) for a in axes)
    if not shape or not axes or shape[0] % ways:
        return PartitionSpec()
    return PartitionSpec(axes[0] if len(axes) == 1 else axes)


def abstract_inputs(model: nnx.Module, parallel: Parallel, shapes: EngineShapes):
    """(weights, slots): ``ShapeDtypeStruct`` trees with the shardings the engine gives them
    (weights by the layout's rules; the cache split over the batch axes, the rest replicated)."""
    state = nnx.state(model.language_model)
    shardings = parallel.state_shardings(state)
    values = state.to_pure_dict()
    weights = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings)
    cfg = model.config.text
    slots = jax.eval_shape(lambda: SlotState.create(
        KVCache.create(cfg, shapes.batch, shapes.max_length, jnp.dtype(shapes.cache_dtype)), cfg.vocab_size))
    replicated = NamedSharding(parallel.mesh, PartitionSpec())
    cache = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(parallel.mesh, _batch_spec(parallel, a.shape))),
        slots.cache,
    )
    rest = {f.name: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                 getattr(slots, f.name))
            for f in dataclasses.fields(slots) if f.name != "cache"}
    return weights, SlotState(cache=cache, **rest)


def moe_kernels(config: KimiConfig, layout: Layout, platform: str, moe_impl: str, expert_format: str) -> dict:
    """The grouped matmul each MoE layer runs on ``platform`` (per-device expert sizes under the layout)."""
    cfg = config.text
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    if expert_format != "int4":
        return {"layers": layers, "experts": expert_format, "kernel": "ragged_dot",
                "description": "kimi_jax.kernels.grouped.ragged_dot over the dense experts: tokamax's kernel "
                               "where the exporting host has the platform's device, else XLA's"}
    ways = math.prod(layout.axis_size(a) for a in layout.mesh_axes_of("expert_mlp"))
    kernel = lowered_int4_kernel(moe_impl, platform, cfg.hidden_size, cfg.moe_intermediate_size // ways)
    return {"layers": layers, "experts": "int4", "impl": moe_impl, "kernel": kernel,
            "description": INT4_KERNELS[kernel]}


def _leaves(tree) -> list[dict]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "spec", None)
        out.append({"path": jax.tree_util.keystr(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                    "sharding": None if spec is None else str(tuple(spec))})
    return out


def _custom_calls(text: str) -> dict[str, int]:
    return {name: n for name in CUSTOM_CALLS if (n := text.count(f"custom_call @{name}("))}


def _versions() -> dict[str, str]:
    versions = {"python": host_platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "kimi-jax"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def export_steps(
    config: KimiConfig, *, platform: str, mesh: str | Path | Layout, out: str | Path,
    shapes: EngineShapes = EngineShapes(), steps: Sequence[str] = STEPS, expert_format: str = "int4",
    dtype: str = "bfloat16", moe_impl: str = "grouped", device_kind: str | None = None, source: str = "",
) -> dict:
    """Exports the engine's ``steps`` for ``platform`` on the layout ``mesh`` into ``out``
    (``<step>.jax_export`` files and ``manifest.json``); returns the manifest.

    Raises :class:`ExportError` for an unknown platform or step, a TPU layout whose chip is
    unknown (pass ``device_kind``), or an MoE kernel with no path on the platform.
    """
    if platform not in PLATFORMS:
        raise ExportError(f"unknown platform {platform!r}; choose from {PLATFORMS}")
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ExportError(f"unknown steps {unknown or list(steps)}; choose from {STEPS}")
    if expert_format == "int4":
        try:
            int4_kernel(moe_impl, platform)
        except ValueError as e:
            raise ExportError(str(e)) from None
    layout = load_layout(mesh)
    kind = device_kind_for(platform, layout, device_kind)
    abstract = target_mesh(layout, platform, kind)
    parallel = Parallel(abstract, layout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config.text
    if shapes.max_length > cfg.max_position_embeddings:
        raise ExportError(f"max_length {shapes.max_length} exceeds the model's context ({cfg.max_position_embeddings})")
    manifest = {
        "format_version": FORMAT_VERSION, "platform": platform, "device_kind": kind,
        "mesh": {"layout": layout.name, "axes": dict(layout.axes), "rules": {k: list(v) for k, v in layout.rules}},
        "model": {"source": source, "layers": cfg.num_hidden_layers, "expert_format": expert_format, "dtype": dtype,
                  "moe_impl": moe_impl},
        "engine": dataclasses.asdict(shapes),
        "kernels": {"moe": moe_kernels(config, layout, platform, moe_impl, expert_format),
                    "attention": "XLA: MLA in the absorbed form (decode) or expanded (long prefill chunks)"},
        "versions": _versions(), "steps": {},
    }
    with jax.sharding.use_abstract_mesh(abstract):
        model = _abstract_model(config, parallel, expert_format, jnp.dtype(dtype), moe_impl)
        graphdef = nnx.graphdef(model.language_model)
        weights, slots = abstract_inputs(model, parallel, shapes)
        for step in steps:
            manifest["steps"][step] = _export_one(step, graphdef, weights, slots, cfg, shapes, platform, out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _export_one(step, graphdef, weights, slots, cfg, shapes: EngineShapes, platform: str, out: Path) -> dict:
    checks = ([jax.export.DisabledSafetyCheck.custom_call(c) for c in (TRITON_CALL, MOSAIC_GPU_CALL)]
              if platform == "cuda" else [])
    w_def, s_def = jax.tree.structure(weights), jax.tree.structure(slots)
    start = time.perf_counter()
    # Serialized pytrees take string-keyed dicts only: the steps take and return flat leaf lists
    # (in jax.tree order, listed in the manifest), rebuilt into the engine's trees inside.
    if step == "decode":
        key_block = key_block_for(cfg, shapes.batch, 1, shapes.max_length, None)

        def flat(w, s):
            out = decode_step(graphdef, jax.tree.unflatten(w_def, w), jax.tree.unflatten(s_def, s), None,
                              key_block=key_block)
            return jax.tree.leaves(out)

        args = {"weights": weights, "slots": slots}
        static = {"key_block": key_block, "absorbed": True}
    else:
        P, T = shapes.rows, shapes.chunk
        key_block = key_block_for(cfg, P, T, shapes.max_length, None)
        absorbed = absorbed_is_cheaper(cfg, T)
        repl = NamedSharding(slots.active.sharding.mesh, PartitionSpec())
        rows, counts = (jax.ShapeDtypeStruct((P,), jnp.int32, sharding=repl) for _ in range(2))
        ids = jax.ShapeDtypeStruct((P, T), jnp.int32, sharding=repl)
        final = jax.ShapeDtypeStruct((P,), jnp.bool_, sharding=repl)

        def flat(w, s, rows, ids, counts, final):
            out = prefill_step(graphdef, jax.tree.unflatten(w_def, w), jax.tree.unflatten(s_def, s), rows, ids, None,
                               counts, final, absorbed=absorbed, key_block=key_block)
            return jax.tree.leaves(out)

        args = {"weights": weights, "slots": slots, "rows": rows, "ids": ids, "counts": counts, "final": final}
        static = {"key_block": key_block, "absorbed": absorbed}
    leaves = [jax.tree.leaves(a) if k in ("weights", "slots") else a for k, a in args.items()]
    exported = jax.export.export(jax.jit(flat), platforms=(platform,), disabled_checks=checks)(*leaves)
    seconds = time.perf_counter() - start
    blob = exported.serialize()
    name = f"{step}.jax_export"
    (out / name).write_bytes(blob)
    return {
        "file": name, "bytes": len(blob), "export_seconds": round(seconds, 2), **static,
        "custom_calls": _custom_calls(exported.mlir_module()),  # call sites: a kernel's shapes share one
        "calling_convention_version": exported.calling_convention_version,
        "inputs": {k: _leaves(v) for k, v in args.items()},
        "weights": {"arrays": len(jax.tree.leaves(weights)),
                    "bytes": sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(weights))},
        "outputs": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in exported.out_avals],
        "out_shardings": [str(s) for s in exported.out_shardings_hlo],
    }
