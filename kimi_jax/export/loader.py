"""Running exported steps (:mod:`kimi_jax.export.steps`) with a converted checkpoint.

:class:`ExportedSteps` reads ``manifest.json`` and the serialized steps, checks that they
were exported for this machine's platform, and calls them on the checkpoint's weights (the
language model's state as a pure dict, ``weights(kimi_jax.load(CKPT, mesh=LAYOUT))``) and
the engine's :class:`SlotState`, checked leaf by leaf against the manifest; the model code
only loads the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.config.model import TextConfig
from kimi_jax.export.steps import MANIFEST, ExportError
from kimi_jax.inference.engine import SlotState
from kimi_jax.model.cache import KVCache


class ExportedSteps:
    """The steps exported into ``folder``: ``decode(weights, slots)`` and ``prefill(weights,
    slots, rows, ids, counts, final)`` with the engine's semantics (``kimi_jax.inference.engine``)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise ExportError(f"{folder} holds no {MANIFEST}: not a folder written by kimi-jax export")
        self.manifest = json.loads((folder / MANIFEST).read_text())
        self.platform = self.manifest["platform"]
        backend = jax.default_backend()
        here = {"gpu": "cuda"}.get(backend, backend)
        if here != self.platform:
            raise ExportError(f"{folder} was exported for {self.platform}; this machine runs {here}")
        self._steps = {
            name: jax.export.deserialize(bytearray((folder / entry["file"]).read_bytes()))
            for name, entry in self.manifest["steps"].items()
        }

    @property
    def shapes(self) -> dict:
        """The engine's shapes the steps were exported for (batch, max_length, prefill_chunk, ...)."""
        return self.manifest["engine"]

    def new_slots(self, config: TextConfig) -> SlotState:
        """An empty :class:`SlotState` of the exported shapes for the model of ``config``."""
        e = self.shapes
        cache = KVCache.create(config, e["batch"], e["max_length"], jnp.dtype(e["cache_dtype"]))
        return SlotState.create(cache, config.vocab_size)

    def _check(self, name: str, tree, entries: list[dict]) -> list:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        if len(leaves) != len(entries):
            raise ExportError(f"{name}: {len(leaves)} arrays given, the exported step takes {len(entries)}")
        for (path, leaf), e in zip(leaves, entries, strict=True):
            where = jax.tree_util.keystr(path)
            if where != e["path"] or list(leaf.shape) != e["shape"] or str(leaf.dtype) != e["dtype"]:
                raise ExportError(
                    f"{name}: array {where} {tuple(leaf.shape)} {leaf.dtype} where the exported step takes "
                    f"{e['path']} {tuple(e['shape'])} {e['dtype']} (another model, layout or shapes?)"
                )
        return [leaf for _, leaf in leaves]

    def decode(self, weights: dict, slots: SlotState) -> tuple[SlotState, jax.Array, jax.Array]:
        """One token for every active slot: (slots, tokens [S], finished [S])."""
        return self._call("decode", weights, slots)

    def prefill(self, weights: dict, slots: SlotState, rows, ids, counts, final) -> tuple[SlotState, jax.Array, jax.Array]:
        """One prompt chunk into slots ``rows``: (slots, tokens [S], finished [S])."""
        return self._call("prefill", weights, slots, jnp.asarray(rows, jnp.int32), jnp.asarray(ids, jnp.int32),
                          jnp.asarray(counts, jnp.int32), jnp.asarray(final, bool))

    def _call(self, step: str, weights: dict, slots: SlotState, *rest):
        if step not in self._steps:
            raise ExportError(f"no {step} step was exported (exported: {sorted(self._steps)})")
        inputs = self.manifest["steps"][step]["inputs"]
        w = self._check("weights", weights, inputs["weights"])
        s = self._check("slots", slots, inputs["slots"])
        out = self._steps[step].call(w, s, *rest)
        return jax.tree.unflatten(jax.tree.structure((slots, 0, 0)), out)



def weights(model) -> dict:
    """A loaded model's language-model weights as the exported steps take them."""
    return nnx.state(model.language_model).to_pure_dict()
