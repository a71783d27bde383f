"""Parallelism as values: mesh layouts and their logical-axis rules (``layout``), the
``Parallel`` value (a mesh plus its layout) the model and engine receive, placement of
arrays and models on a mesh (``placement``), expert parallelism (``expert``) and
multi-process start-up (``distributed``)."""

from kimi_jax.parallel.layout import (
    DEFAULT_RULES,
    Layout,
    LayoutError,
    load_layout,
    packaged_layouts,
)
from kimi_jax.parallel.placement import Parallel, constrain, shard_model, to_host

__all__ = [
    "DEFAULT_RULES", "Layout", "LayoutError", "Parallel", "constrain", "load_layout", "packaged_layouts",
    "shard_model", "to_host",
]
