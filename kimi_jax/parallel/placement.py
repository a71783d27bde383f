"""Where arrays live: the ``Parallel`` value (a device mesh plus the layout that maps logical
axes onto it), shardings of model states, activation constraints, and moving a model onto
a mesh.

Parallelism is passed in, never looked up: ``Kimi(config, parallel=...)``,
``load(path, mesh=...)`` and :func:`shard_model` hand the ``Parallel`` to every module
that needs it (the decoder pins activations with it, the MoE runs expert-parallel on it).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding

from kimi_jax.parallel.layout import Layout, LayoutError, load_layout, mesh_layout


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A device mesh and the layout whose rules place logical axes on it."""

    mesh: Mesh
    layout: Layout

    @classmethod
    def create(cls, layout: str | Path | Layout | Mesh, devices: list | None = None) -> Parallel:
        """The layout (a name, TOML path, inline mesh or :class:`Layout`) on ``devices``
        (default: all devices of all processes; a layout may use fewer). A
        ``jax.sharding.Mesh`` whose axis names are layout axes (``data``, ``expert``,
        ``tensor``) is used with the default rules (its axes as ``Auto``: the model places its
        arrays by the rules, not by mesh-typed sharding)."""
        if isinstance(layout, Mesh):
            if devices is not None:
                raise LayoutError("a Mesh brings its own devices; pass devices= only with a layout")
            mesh = layout
            if any(t != AxisType.Auto for t in mesh.axis_types):  # the model places arrays itself
                mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
            return cls(mesh, mesh_layout(mesh))
        layout = load_layout(layout)
        return cls(layout.make_mesh(devices), layout)

    def sharding(self, logical_axes, shape=None) -> NamedSharding:
        """The NamedSharding of an array with these logical axes (and, to check divisibility, shape)."""
        return NamedSharding(self.mesh, self.layout.spec(tuple(logical_axes), None if shape is None else tuple(shape)))

    def state_shardings(self, state) -> dict:
        """NamedShardings for an NNX state (``nnx.state(model)``), as a pure dict of its layout.

        Every variable must carry ``axes`` metadata (declared with ``kimi_jax.model.layers.weight``).
        """
        flat = {}
        for path, var in nnx.to_flat_state(state):
            axes = var.get_metadata().get("axes")
            where = "/".join(map(str, path))
            if axes is None:
                raise LayoutError(f"variable {where} declares no logical axes")
            try:
                flat[path] = self.sharding(axes, var.shape)
            except LayoutError as e:
                raise LayoutError(f"{where}: {e}") from None
        return nnx.State.from_flat_path(flat).to_pure_dict()

    def constrain(self, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        """Pins an activation's sharding by its logical axes; a dimension the mesh cannot
        split evenly (a small batch) stays whole."""
        axes = tuple(
            a if x.shape[i] % math.prod(self.mesh.shape[m] for m in self.layout.mesh_axes_of(a)) == 0 else None
            for i, a in enumerate(logical_axes)
        )
        return jax.lax.with_sharding_constraint(x, self.sharding(axes))

    def place_batch(self, tree):
        """Every array of ``tree`` (leading axis: the batch, e.g. a KV cache) split over the
        layout's batch axes; a batch the mesh cannot split evenly stays whole."""
        ways = math.prod(self.mesh.shape[a] for a in self.layout.mesh_axes_of("batch"))

        def place(a):
            axis = "batch" if a.shape[0] % ways == 0 else None
            return jax.device_put(a, self.sharding((axis,) + (None,) * (a.ndim - 1)))

        return jax.tree.map(place, tree)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...], parallel: Parallel | None) -> jax.Array:
    """:meth:`Parallel.constrain`, or ``x`` as it is without a mesh."""
    return x if parallel is None else parallel.constrain(x, logical_axes)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded) array's whole value on this host; gathered from the other
    processes when some of its shards live on their devices."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard_model(model, mesh: str | Path | Layout | Parallel, devices: list | None = None):
    """A copy of ``model`` (a :class:`~kimi_jax.model.Kimi`) whose parameters live in the
    shardings of a layout and which runs on that mesh (the MoE layers expert-parallel,
    activations and the KV cache sharded). The input keeps its arrays.
    """
    parallel = mesh if isinstance(mesh, Parallel) else Parallel.create(mesh, devices)
    graphdef, state = nnx.split(model.rebuild(parallel))
    _, values = nnx.split(model)
    shardings = parallel.state_shardings(state)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, values.to_pure_dict(), shardings))
    return nnx.merge(graphdef, state)
