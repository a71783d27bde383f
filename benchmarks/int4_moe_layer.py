"""One INT4 MoE layer at Kimi K2.5's real sizes on one accelerator: time per call and bandwidth.

384 routed experts of 7168 x 2048 (top 8; int4 values with one bf16 scale per 32), one
shared expert, random weights, bf16 activations. For each token count it prints the median
time of one jitted call of the whole layer (router, routed experts, shared expert), the
distinct experts the tokens chose, and the achieved bandwidth: the bytes a call must read
at least (the chosen experts' int4 values and scales, the router, the shared expert) over
that time.

    PYTHONPATH=. python benchmarks/int4_moe_layer.py [--tokens 1 8 64 256] [--reference-max 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.config.model import kimi_k25_config
from kimi_jax.model.moe import INT4_GROUP_SIZE, MoE


def time_call(fn, *args, iters: int) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up (compiling) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--reference-max", type=int, default=8,
                        help="largest token count for the reference path (it gathers [T, K, F, D] weights)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    cfg = kimi_k25_config().text
    E, D, F, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {E} experts {D} x {F}, top {K}, "
          f"{cfg.n_shared_experts} shared")
    t0 = time.perf_counter()
    moe = MoE(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), expert_format="int4")
    jax.block_until_ready(nnx.state(moe))
    per_expert = 3 * D * F * (4 + 16 / INT4_GROUP_SIZE) / 8  # bytes: int4 values + bf16 scales
    fixed = E * D * 2 + 3 * D * cfg.shared_intermediate_size * 2  # router + shared expert, bf16
    print(f"built in {time.perf_counter() - t0:.1f} s; routed experts {E * per_expert / 1e9:.2f} GB on the device "
          f"({8 * per_expert / (3 * D * F):.2f} bits per weight)")

    route = jax.jit(lambda x: moe.gate(x)[1])
    print(f"{'tokens':>6} {'impl':>9} {'ms / call':>10} {'experts':>8} {'min bytes':>10} {'TB/s':>6}")
    for impl in ("grouped", "reference"):
        moe.set_impl(impl)
        graphdef, state = nnx.split(moe)
        step = jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x))
        for T in args.tokens:
            if impl == "reference" and T > args.reference_max:
                continue
            x = jax.random.normal(jax.random.key(T), (T, D), jnp.bfloat16)
            used = len(np.unique(np.asarray(route(x))))
            seconds = time_call(step, state, x, iters=args.iters)
            need = used * per_expert + fixed
            print(f"{T:>6} {impl:>9} {seconds * 1e3:>10.3f} {used:>8} {need / 1e9:>8.2f} GB "
                  f"{need / seconds / 1e12:>6.2f}")


if __name__ == "__main__":
    main()
