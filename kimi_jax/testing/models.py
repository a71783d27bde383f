"""Models with random weights made directly on the devices (benchmarks, real-size checks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.config.model import KimiConfig
from kimi_jax.model.kimi import Kimi
from kimi_jax.parallel.placement import Parallel


def random_model(
    config: KimiConfig, *, dtype=jnp.bfloat16, expert_format: str = "int4", parallel: Parallel | None = None,
    seed: int = 0,
) -> Kimi:
    """``Kimi(config)`` with random weights, each array created on the devices in its
    sharding under ``parallel`` (one compiled initializer: no host copy of the weights)."""

    def make() -> Kimi:
        return Kimi(config, dtype=dtype, rngs=nnx.Rngs(seed), expert_format=expert_format, parallel=parallel)

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = None if parallel is None else parallel.state_shardings(abstract)
    pure = jax.jit(lambda: nnx.state(make()).to_pure_dict(), out_shardings=shardings)()
    nnx.replace_by_pure_dict(abstract, pure)
    return nnx.merge(graphdef, abstract)
