"""Mesh layouts as data: mesh axes plus the logical-axis -> mesh-axis rules.

A layout is a small TOML file (the packaged ones live in the repository's ``sharding/``
folder and are named by their file stem, e.g. ``gpu-2``), a path to such a file, or an
inline mesh ``data=1,expert=4,tensor=2``. Every layout starts from :data:`DEFAULT_RULES`;
a file's ``[rules]`` table overrides single entries (an empty list replicates that axis). The model declares
logical axes on every weight (``kimi_jax.model.layers.weight``); this module turns them into
``PartitionSpec`` / ``NamedSharding`` for a given mesh. Logical axes a layout does not
name are replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from importlib import resources
from pathlib import Path

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec

MESH_AXES = ("data", "expert", "tensor")
DEFAULT_RULES = {
    "batch": ("data",),
    "expert": ("expert",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "expert_mlp": ("tensor",),
    "vocab": ("tensor",),
}
"""Logical axis -> mesh axes. ``X_groups``, the axis of the INT4 scales (one per 32 values of
``X``), follows the rule of ``X`` unless a layout names it, and must be split exactly like it."""
_INLINE = re.compile(r"^\s*\w+\s*=\s*\d+\s*(,\s*\w+\s*=\s*\d+\s*)*$")


class LayoutError(ValueError):
    """A mesh layout that cannot be used as written."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Mesh axis sizes and the rules mapping logical axes to mesh axes."""

    name: str
    axes: tuple[tuple[str, int], ...]
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self):
        names = [a for a, _ in self.axes]
        for a, n in self.axes:
            if n < 1:
                raise LayoutError(f"layout {self.name}: mesh axis {a!r} has size {n}")
        for logical, mesh_axes in self.rules:
            for m in mesh_axes:
                if m not in names:
                    raise LayoutError(f"layout {self.name}: rule {logical!r} -> {m!r} names no mesh axis of {names}")
            if len(set(mesh_axes)) != len(mesh_axes):
                raise LayoutError(f"layout {self.name}: rule {logical!r} repeats a mesh axis: {list(mesh_axes)}")
        rules = dict(self.rules)
        for logical in rules:
            base = logical.removesuffix("_groups")
            if base != logical and rules.get(base, ()) != rules[logical]:
                raise LayoutError(
                    f"layout {self.name}: {logical!r} (INT4 scale groups) -> {list(rules[logical])} must be split "
                    f"like {base!r} -> {list(rules.get(base, ()))}; set both"
                )

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def size(self) -> int:
        return math.prod(n for _, n in self.axes)

    def axis_size(self, name: str) -> int:
        return self.shape.get(name, 1)

    def mesh_axes_of(self, logical: str | None) -> tuple[str, ...]:
        """Mesh axes a logical axis is split over (empty: replicated)."""
        return dict(self.rules).get(logical, ()) if logical else ()

    def spec(self, logical_axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> PartitionSpec:
        """The PartitionSpec of an array with these logical axes; checks reuse and divisibility."""
        used: dict[str, str] = {}
        parts = []
        for i, logical in enumerate(logical_axes):
            mesh_axes = self.mesh_axes_of(logical)
            for m in mesh_axes:
                if m in used:
                    raise LayoutError(
                        f"layout {self.name}: logical axes {used[m]!r} and {logical!r} of one array both map "
                        f"to mesh axis {m!r}"
                    )
                used[m] = logical
            if shape is not None and mesh_axes:
                ways = math.prod(self.axis_size(m) for m in mesh_axes)
                if shape[i] % ways:
                    raise LayoutError(
                        f"layout {self.name}: axis {logical!r} of size {shape[i]} cannot be split {ways} ways "
                        f"over mesh axes {list(mesh_axes)}"
                    )
            parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
        return PartitionSpec(*parts)

    def make_mesh(self, devices: list | None = None) -> Mesh:
        """A mesh over ``devices`` (default: all devices of all processes)."""
        devices = list(devices if devices is not None else jax.devices())
        if len(devices) != self.size:
            raise LayoutError(
                f"layout {self.name} needs {self.size} devices ({self.describe()}), but {len(devices)} are available"
            )
        names = tuple(a for a, _ in self.axes)
        sizes = tuple(n for _, n in self.axes)
        return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)

    def abstract_mesh(self) -> jax.sharding.AbstractMesh:
        """The mesh's shape without devices: for checking or lowering against a layout."""
        return jax.sharding.AbstractMesh(tuple(n for _, n in self.axes), tuple(a for a, _ in self.axes))

    def describe(self) -> str:
        return ",".join(f"{a}={n}" for a, n in self.axes)


def _from_dict(name: str, d: dict) -> Layout:
    mesh = d.get("mesh")
    if not isinstance(mesh, dict) or not mesh:
        raise LayoutError(f"layout {name}: no [mesh] table of axis sizes")
    rules = d.get("rules", {})
    if not isinstance(rules, dict):
        raise LayoutError(f"layout {name}: [rules] must be a table of logical axis = mesh axis or list of them")
    # Defaults that name a mesh axis this layout does not have leave that axis out.
    merged = {logical: tuple(m for m in target if m in mesh) for logical, target in DEFAULT_RULES.items()}
    for logical, target in rules.items():
        merged[logical] = (target,) if isinstance(target, str) else tuple(target)
    for logical in list(merged):
        if not logical.endswith("_groups") and f"{logical}_groups" not in rules:
            merged[f"{logical}_groups"] = merged[logical]
    return Layout(name, tuple((a, int(n)) for a, n in mesh.items()), tuple(merged.items()))


def packaged_layouts() -> dict[str, Path]:
    """Layout files shipped with the package, by name."""
    folder = resources.files("kimi_jax") / "layouts"
    if not folder.is_dir():
        folder = Path(__file__).resolve().parents[2] / "sharding"  # a source tree without install
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def mesh_layout(mesh: Mesh) -> Layout:
    """The layout of an existing ``jax.sharding.Mesh``: its axes (named like
    :data:`MESH_AXES`) with the default rules."""
    unknown = set(mesh.axis_names) - set(MESH_AXES)
    if unknown:
        raise LayoutError(f"mesh axes {sorted(unknown)} are not layout axes; name the mesh's axes from {list(MESH_AXES)}")
    return _from_dict("mesh(" + ",".join(f"{a}={n}" for a, n in mesh.shape.items()) + ")", {"mesh": dict(mesh.shape)})


def load_layout(spec: str | Path | Layout) -> Layout:
    """A layout from a packaged name (``gpu-2``), a TOML path, or ``data=1,expert=4,tensor=2``."""
    if isinstance(spec, Layout):
        return spec
    text = str(spec)
    if _INLINE.match(text):
        sizes = {}
        for part in text.split(","):
            k, v = (s.strip() for s in part.split("="))
            sizes[k] = int(v)
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise LayoutError(f"inline mesh {text!r}: unknown axes {sorted(unknown)}; use {list(MESH_AXES)}")
        return _from_dict(text, {"mesh": {a: sizes.get(a, 1) for a in MESH_AXES}})
    path = Path(text)
    if not path.is_file():
        known = packaged_layouts()
        if text not in known:
            raise LayoutError(
                f"no mesh layout {text!r}: not a file, not one of {sorted(known)}, not an inline mesh like "
                "data=1,expert=4,tensor=2"
            )
        path = known[text]
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LayoutError(f"layout file {path} is not valid TOML: {e}") from None
    return _from_dict(path.stem, d)
