"""Loading a converted checkpoint into a model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from orbax.checkpoint import v1 as ocp

from kimi_jax.config import KimiConfig
from kimi_jax.convert import DTYPES, INFO_FILE, PARAMS_DIR
from kimi_jax.model import Kimi
from kimi_jax.sharding import Layout, load_layout, state_shardings


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


def load(
    path: str | Path,
    *,
    dtype: str | jnp.dtype | None = None,
    moe_impl: str = "grouped",
    mesh: str | Layout | None = None,
) -> Kimi:
    """Loads a converted checkpoint: ``model = load(path)``; ``model(input_ids)`` -> logits.

    ``dtype`` (default: the checkpoint's) sets parameters and activations; arrays are cast
    while they are read. INT4 experts (``expert_format`` ``"int4"`` in ``kimi_jax.json``)
    stay int4 with bfloat16 scales whatever ``dtype``; they are dequantized to it in use.

    ``mesh`` (a layout name such as ``gpu-2``, a TOML path, ``data=1,expert=4,tensor=2`` or
    a :class:`~kimi_jax.sharding.Layout`) restores every array straight into its sharding on
    that mesh (each process reads only the shards its devices hold) and makes the model run
    there; without it the model lives on the first device.
    """
    path = Path(path)
    info = checkpoint_info(path)
    config = KimiConfig.from_file(path / "config.json")
    dtype = jnp.dtype(DTYPES[info["dtype"]] if dtype is None else dtype)
    expert_format = info.get("expert_format", "dense")
    abstract = nnx.eval_shape(
        lambda: Kimi(config, dtype=dtype, rngs=nnx.Rngs(0), moe_impl=moe_impl, expert_format=expert_format)
    )
    graphdef, state = nnx.split(abstract)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state.to_pure_dict())
    else:
        layout = load_layout(mesh)
        device_mesh = layout.make_mesh()
        shardings = state_shardings(state, device_mesh, layout)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.to_pure_dict(), shardings
    )
    options = ocp.options.PyTreeOptions(loading=ocp.options.PyTreeOptions.Loading(partial_load=True))
    with ocp.Context(pytree_options=options):
        restored = ocp.load(path / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        model.language_model.parallel = (device_mesh, layout)
    return model
