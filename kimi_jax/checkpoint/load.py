"""Loading a converted checkpoint into a model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from orbax.checkpoint import v1 as ocp

from kimi_jax.checkpoint import integrity
from kimi_jax.checkpoint.convert import DTYPES, FORMAT_VERSION, INFO_FILE, PARAMS_DIR
from kimi_jax.checkpoint.destination import absolute
from kimi_jax.config.model import KimiConfig
from kimi_jax.model.decoder import per_layer
from kimi_jax.model.kimi import Kimi
from kimi_jax.parallel.layout import Layout
from kimi_jax.parallel.placement import Parallel
from kimi_jax.quant.formats import pack_words

READ_CONCURRENT_BYTES = 1 << 30
"""At most this many bytes are being read from the checkpoint at once (bounds host memory)."""


def checkpoint_info(path: str | Path) -> dict:
    """The ``kimi_jax.json`` written by the converter; a clear error if ``path`` is no checkpoint
    or the file is malformed (``ValueError`` naming the file and field)."""
    path = absolute(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a checkpoint folder")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    info_file = path / INFO_FILE
    if not info_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"{path} is not a converted kimi-jax checkpoint (no {INFO_FILE} / {PARAMS_DIR}/); "
            "convert a Hugging Face checkpoint first with `kimi-jax convert SRC DST`"
        )
    try:
        info = json.loads(info_file.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{info_file} cannot be read ({type(e).__name__}: {e}); convert the checkpoint again") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_file} is not a JSON object; convert the checkpoint again")
    if info.get("dtype") not in DTYPES:
        raise ValueError(f"{info_file}: unknown dtype {info.get('dtype')!r} (this kimi-jax writes "
                         f"{' or '.join(sorted(DTYPES))}); convert the checkpoint again")
    if info.get("expert_format", "dense") not in ("dense", "int4"):
        raise ValueError(f"{info_file}: unknown expert_format {info.get('expert_format')!r} (expected dense or "
                         "int4); convert the checkpoint again")
    return info


def _check_format(path: Path, info: dict) -> None:
    """Raises ``ValueError`` for a checkpoint layout :func:`load` cannot read (text-only
    checkpoints of format 1 are the same as format 2's; format 2's int4 experts are re-laid)."""
    version = info.get("format_version")
    if version not in (2, FORMAT_VERSION) and not (version == 1 and not info.get("multimodal")):
        raise ValueError(
            f"{path} was converted to checkpoint format {version}, this kimi-jax reads format "
            f"{FORMAT_VERSION}" + (" (vision weights in MoonViT's layout)" if version == 1 else "")
            + ": convert the Hugging Face checkpoint again with `kimi-jax convert SRC DST --overwrite`"
        )


def load(
    path: str | Path,
    *,
    dtype: str | jnp.dtype | None = None,
    moe_impl: str = "grouped",
    mesh: str | Path | Layout | Parallel | Mesh | None = None,
    devices: list | None = None,
    vision_attention: str | None = None,
    verify: bool = False,
) -> Kimi:
    """Loads a converted checkpoint: ``model = load(path)``; ``model(input_ids)`` -> logits.

    ``dtype`` (default: the checkpoint's) sets parameters and activations; arrays are cast
    while they are read. INT4 experts (``expert_format`` ``"int4"`` in ``kimi_jax.json``)
    stay int4 with bfloat16 scales whatever ``dtype``; they are dequantized to it in use.

    ``mesh`` (a layout name such as ``gpu-2``, a TOML path, ``data=1,expert=4,tensor=2``, a
    :class:`~kimi_jax.parallel.Layout` or :class:`~kimi_jax.parallel.Parallel`, or a
    ``jax.sharding.Mesh`` with layout axis names) restores every array straight into its
    sharding on that mesh (each process reads only the shards its devices hold) and makes the
    model run there; ``devices`` picks the layout's devices (default: all). Without a mesh
    the model lives on the first device. The vision tower's and projector's
    logical axes are named by no layout, so they are replicated.

    ``vision_attention`` is the vision tower's attention implementation (``None`` for XLA,
    ``"cudnn"`` for cuDNN flash attention on NVIDIA GPUs in bfloat16; see
    :class:`~kimi_jax.model.vision.MoonViT`).

    ``verify`` first checks every array against the checksums recorded at conversion (see
    :func:`kimi_jax.checkpoint.verify`; this reads the checkpoint once more), raising
    :class:`~kimi_jax.checkpoint.integrity.ChecksumError` naming each bad array. Without it,
    an array file that is missing or cut short still fails with one ``ValueError`` naming the
    array and the file.
    """
    path = absolute(path)
    info = checkpoint_info(path)
    _check_format(path, info)
    if verify:
        integrity.verify(path)
    config = KimiConfig.from_file(path / "config.json")
    dtype = jnp.dtype(DTYPES[info["dtype"]] if dtype is None else dtype)
    expert_format = info.get("expert_format", "dense")
    parallel = None if mesh is None else mesh if isinstance(mesh, Parallel) else Parallel.create(mesh, devices)
    abstract = nnx.eval_shape(
        lambda: Kimi(config, dtype=dtype, rngs=nnx.Rngs(0), moe_impl=moe_impl, expert_format=expert_format,
                     vision_attention=vision_attention, parallel=parallel)
    )
    graphdef, state = nnx.split(abstract)
    if parallel is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, state.to_pure_dict())
    else:
        shardings = parallel.state_shardings(state)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.to_pure_dict(), shardings
    )
    restored = _restore(path, target, config, int4_as_values=expert_format == "int4" and info["format_version"] < 3)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def _restore(path: Path, target: dict, config: KimiConfig, *, int4_as_values: bool) -> dict:
    """The model's arrays (``target``: ShapeDtypeStructs with shardings) read from the
    checkpoint, whose decoder layers are stored one by one: each run of stacked layers is
    allocated, then filled a layer at a time in place, so reading takes at most one layer
    beyond the model. ``int4_as_values``: INT4 experts stored as int4 values (format 2)."""
    lm = target["language_model"]
    rest = {**target, "language_model": {k: v for k, v in lm.items() if k != "runs"}}
    restored = _read(path, rest, int4_as_values)
    layers = per_layer(config.text, lm)["layers"]
    runs = {}
    for r, (start, count) in enumerate(config.text.layer_runs):
        run_shardings = jax.tree.map(lambda t: t.sharding, lm["runs"][r])
        stack = jax.jit(lambda run=lm["runs"][r]: jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), run),
                        out_shardings=run_shardings)()
        insert = jax.jit(_insert, donate_argnums=0, out_shardings=run_shardings)
        for j in range(count):
            layer = _read(path, {"language_model": {"layers": {start + j: layers[start + j]}}}, int4_as_values)
            stack = insert(stack, layer["language_model"]["layers"][start + j], j)
        runs[r] = stack
    restored["language_model"]["runs"] = runs
    return restored


def _insert(stack, layer, j):
    """``stack`` (a run's arrays, [L, ...]) with entry ``j`` replaced by ``layer``'s arrays."""
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x.astype(s.dtype), j, 0), stack, layer)


def _read(path: Path, target: dict, int4_as_values: bool) -> dict:
    """The arrays of ``target`` (a part of the checkpoint's tree) read into their shardings;
    a file that is missing or cut short raises one ``ValueError`` naming the array."""
    shardings = jax.tree.map(lambda t: t.sharding, target)
    if int4_as_values:
        target = jax.tree.map(_as_int4, target)
    options = ocp.options.PyTreeOptions(loading=ocp.options.PyTreeOptions.Loading(partial_load=True))
    memory = ocp.options.MemoryOptions(read_concurrent_bytes=READ_CONCURRENT_BYTES)
    error = None
    try:
        with ocp.Context(pytree_options=options, memory_options=memory):
            restored = ocp.load(path / PARAMS_DIR, target)
    except Exception as e:  # noqa: BLE001 - tensorstore read failures become one line naming the array
        error = integrity.read_error(path, e)
        if error is None:
            raise
    if error is not None:
        raise error
    missing = [jax.tree_util.keystr(p, simple=True, separator="/") for p, x in jax.tree_util.tree_leaves_with_path(restored)
               if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:  # partial loading leaves what the checkpoint lacks as it was asked for
        raise ValueError(f"{path} lacks the arrays {missing[:5]}{' ...' if len(missing) > 5 else ''}: convert the "
                         "Hugging Face checkpoint again with `kimi-jax convert SRC DST --overwrite`")
    return jax.tree.map(_as_words, restored, shardings)


def _as_int4(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """An INT4 words target as the int4 array of a format-2 checkpoint (8 values per word)."""
    if leaf.dtype != jnp.uint32:
        return leaf
    return jax.ShapeDtypeStruct((*leaf.shape[:-1], leaf.shape[-1] * 8), jnp.int4, sharding=leaf.sharding)


def _as_words(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    """Re-lays a restored int4 array as the device's words, in place (donated), same sharding."""
    if x.dtype != jnp.int4:
        return x
    return jax.jit(pack_words, out_shardings=sharding, donate_argnums=0)(x)
