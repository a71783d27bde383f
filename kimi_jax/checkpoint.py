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
) -> Kimi:
    """Loads a converted checkpoint: ``model = load(path)``; ``model(input_ids)`` -> logits.

    ``dtype`` (default: the checkpoint's) sets parameters and activations; arrays are cast
    while they are read. INT4 experts (``expert_format`` ``"int4"`` in ``kimi_jax.json``)
    stay int4 with bfloat16 scales whatever ``dtype``; they are dequantized to it in use.
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
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state.to_pure_dict()
    )
    options = ocp.options.PyTreeOptions(loading=ocp.options.PyTreeOptions.Loading(partial_load=True))
    with ocp.Context(pytree_options=options):
        restored = ocp.load(path / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
