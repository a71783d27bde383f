"""Models with random weights made directly on the devices (benchmarks, real-size checks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from kimi_jax.config.model import KimiConfig
from kimi_jax.model.kimi import Kimi
from kimi_jax.parallel.placement import Parallel

LARGE_ARRAY_BYTES = 1 << 30
"""Arrays of at least this size are made one per compiled initializer (see :func:`random_model`)."""


def random_model(
    config: KimiConfig, *, dtype=jnp.bfloat16, expert_format: str = "int4", parallel: Parallel | None = None,
    seed: int = 0,
) -> Kimi:
    """``Kimi(config)`` with random weights, each array created on the devices in its
    sharding under ``parallel`` (compiled initializers: no host copy of the weights).

    The arrays of :data:`LARGE_ARRAY_BYTES` or more (a real-size cut's stacked experts) are
    made one per initializer and the rest in one, so the device holds at most one large
    array's temporaries beside the weights made so far: the peak is about the weights
    themselves. The values are those of a single initializer (each one computes the whole
    model's random streams and keeps only its arrays)."""

    def make() -> Kimi:
        return Kimi(config, dtype=dtype, rngs=nnx.Rngs(seed), expert_format=expert_format, parallel=parallel)

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shapes = traverse_util.flatten_dict(abstract.to_pure_dict())
    shardings = {} if parallel is None else traverse_util.flatten_dict(parallel.state_shardings(abstract))
    large = [path for path, a in shapes.items() if a.size * a.dtype.itemsize >= LARGE_ARRAY_BYTES]
    small = [path for path in shapes if path not in large]
    made = {}
    for paths in [[path] for path in large] + [small]:
        if paths:
            def init(paths=paths):
                flat = traverse_util.flatten_dict(nnx.state(make()).to_pure_dict())
                return [flat[path] for path in paths]

            out = jax.jit(init, out_shardings=[shardings.get(path) for path in paths] if shardings else None)()
            made.update(zip(paths, out, strict=True))
    nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(made))
    return nnx.merge(graphdef, abstract)
