"""Loading a converted checkpoint into a model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from orbax.checkpoint import v1 as ocp

from kimi_jax.checkpoint.convert import DTYPES, FORMAT_VERSION, INFO_FILE, PARAMS_DIR
from kimi_jax.config.model import KimiConfig
from kimi_jax.model.kimi import Kimi
from kimi_jax.parallel.layout import Layout
from kimi_jax.parallel.placement import Parallel

READ_CONCURRENT_BYTES = 1 << 30
"""At most this many bytes are being read from the checkpoint at once (bounds host memory)."""


def checkpoint_info(path: str | Path) -> dict:
    """The ``kimi_jax.json`` written by the converter; a clear error if ``path`` is no checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    info_file = path / INFO_FILE
    if not info_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"{path} is not a converted kimi-jax checkpoint (no {INFO_FILE} / {PARAMS_DIR}/); "
            "convert a Hugging Face checkpoint first with `kimi-jax convert SRC DST`"
        )
    return json.loads(info_file.read_text())


def _check_format(path: Path, info: dict) -> None:
    """Raises ``ValueError`` for a checkpoint layout :func:`load` cannot read (text-only
    checkpoints of format 1 are the same as format 2's)."""
    version = info.get("format_version")
    if version != FORMAT_VERSION and not (version == 1 and not info.get("multimodal")):
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
    mesh: str | Path | Layout | Parallel | None = None,
    vision_attention: str | None = None,
) -> Kimi:
    """Loads a converted checkpoint: ``model = load(path)``; ``model(input_ids)`` -> logits.

    ``dtype`` (default: the checkpoint's) sets parameters and activations; arrays are cast
    while they are read. INT4 experts (``expert_format`` ``"int4"`` in ``kimi_jax.json``)
    stay int4 with bfloat16 scales whatever ``dtype``; they are dequantized to it in use.

    ``mesh`` (a layout name such as ``gpu-2``, a TOML path, ``data=1,expert=4,tensor=2`` or
    a :class:`~kimi_jax.parallel.Layout` or :class:`~kimi_jax.parallel.Parallel`) restores every array straight into its sharding on
    that mesh (each process reads only the shards its devices hold) and makes the model run
    there; without it the model lives on the first device. The vision tower's and projector's
    logical axes are named by no layout, so they are replicated.

    ``vision_attention`` is the vision tower's attention implementation (``None`` for XLA,
    ``"cudnn"`` for cuDNN flash attention on NVIDIA GPUs in bfloat16; see
    :class:`~kimi_jax.model.vision.MoonViT`).
    """
    path = Path(path)
    info = checkpoint_info(path)
    _check_format(path, info)
    config = KimiConfig.from_file(path / "config.json")
    dtype = jnp.dtype(DTYPES[info["dtype"]] if dtype is None else dtype)
    expert_format = info.get("expert_format", "dense")
    parallel = None if mesh is None else mesh if isinstance(mesh, Parallel) else Parallel.create(mesh)
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
    options = ocp.options.PyTreeOptions(loading=ocp.options.PyTreeOptions.Loading(partial_load=True))
    memory = ocp.options.MemoryOptions(read_concurrent_bytes=READ_CONCURRENT_BYTES)
    with ocp.Context(pytree_options=options, memory_options=memory):
        restored = ocp.load(path / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
