"""One MoE layer at Kimi K2.5's real sizes on one accelerator, against the measured floors.

384 routed experts of 7168 x 2048 (top 8), one shared expert, random weights, bf16
activations; INT4 experts (int4 values + one bf16 scale per 32 inputs), then bf16 experts
through each grouped-matmul backend of ``--bf16-backends`` (``kimi_jax.kernels.grouped``:
``xla``, stock ``ragged_dot``, up to ``--bf16-max`` tokens; ``tokamax``, its kernel).
After measuring the copy bandwidth and the bf16 matmul rate, for each token count and grouped
implementation (INT4: ``grouped-pallas``, the fused kernel; ``grouped-xla``, dequantize then
the grouped matmul, backend ``auto``) it reports the median ms of one jitted call of the whole
layer (router, routed experts, shared expert), the bytes a call must read at least (the
distinct chosen experts' weights, the router, the shared expert), the achieved TB/s and its
ratio to the copy bandwidth, and for prefill sizes the TFLOP/s and its ratio to the matmul
rate. The pallas output is compared with the XLA one, and bf16 tokamax with bf16 xla (max
relative error, bf16).

    PYTHONPATH=. python benchmarks/moe.py [--tokens 1 8 64 256 4096 16384] [--xla-max 256]

Rows are appended to ``benchmarks/results/moe.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from floors import (
    RESULTS,
    copy_bandwidth,
    device_name,
    matmul_rate,
    median_seconds,
    record,
)

from kimi_jax.config.model import kimi_k25_config
from kimi_jax.kernels import grouped
from kimi_jax.model.moe import INT4_GROUP_SIZE, MoE

COMPARED = [(("grouped-pallas", "auto"), ("grouped-xla", "auto")), (("grouped", "tokamax"), ("grouped", "xla"))]
"""(impl, backend) pairs whose outputs are compared: a kernel's, then XLA's (the error's scale)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 4096, 16384])
    parser.add_argument("--xla-max", type=int, default=256,
                        help="largest token count for grouped-xla (it writes every expert in bf16 first)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", nargs="+", default=["grouped-pallas", "grouped-xla"],
                        choices=["grouped-pallas", "grouped-xla"])
    parser.add_argument("--bf16-max", type=int, default=256,
                        help="largest token count for bf16 experts through the xla backend (stock ragged_dot; "
                             "0: skip bf16 experts)")
    parser.add_argument("--bf16-backends", nargs="+", default=["xla", "tokamax"], choices=grouped.BACKENDS[1:],
                        help="grouped-matmul backends to measure bf16 experts with")
    parser.add_argument("--out", default=str(RESULTS / "moe.jsonl"))
    args = parser.parse_args()

    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"{device_name()}, jax {jax.__version__}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    cfg = kimi_k25_config().text
    E, D, F, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    fixed = E * D * 2 + 3 * D * cfg.shared_intermediate_size * 2  # router + shared expert, bf16
    print(f"{'tokens':>6} {'experts':>7} {'impl':>15} {'backend':>8} {'ms':>9} {'chosen':>6} {'GB':>6} {'TB/s':>6} "
          f"{'bw %':>5} {'TFLOP/s':>8} {'mm %':>5} {'rel err':>8}")
    # (format, bytes per expert, (impl, grouped-matmul backend) pairs); int4 rows: the backend of grouped-xla
    formats = [("int4", 3 * D * F * (4 + 16 / INT4_GROUP_SIZE) / 8, [(impl, "auto") for impl in args.impls])]
    if args.bf16_max:
        formats.append(("bf16", 3 * D * F * 2, [("grouped", backend) for backend in args.bf16_backends]))
    for fmt, per_expert, variants in formats:
        moe = MoE(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), expert_format="int4" if fmt == "int4" else "dense")
        jax.block_until_ready(nnx.state(moe))
        route = jax.jit(lambda x, moe=moe: moe.gate(x)[1])
        state = nnx.state(moe)
        steps = {}
        for impl, backend in variants:
            moe.set_impl(impl)
            graphdef = nnx.graphdef(moe)
            steps[impl, backend] = jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x))
        for T in args.tokens:
            x = jax.random.normal(jax.random.key(T), (T, D), jnp.bfloat16)
            used = len(np.unique(np.asarray(route(x))))
            need = used * per_expert + fixed
            flops = 2 * T * (K + cfg.n_shared_experts) * 3 * D * F
            outputs = {}
            for (impl, backend), step in steps.items():
                limit = args.xla_max if impl == "grouped-xla" else args.bf16_max if backend == "xla" else None
                if limit is not None and T > limit:
                    continue
                chosen = contextlib.nullcontext() if backend == "auto" else grouped.use_backend(backend)
                try:
                    with chosen:
                        seconds = median_seconds(step, state, x, iters=args.iters)
                        outputs[impl, backend] = step(state, x)
                except Exception as e:  # out of memory: recorded, not fatal
                    print(f"{T:>6} {fmt:>7} {impl:>15} {backend:>8} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]}")
                    record(args.out, tokens=T, experts=fmt, impl=impl, backend=backend,
                           error=str(e).splitlines()[0][:300])
                    continue
                err = None
                for pair in COMPARED:
                    if (impl, backend) in pair and all(k in outputs for k in pair):
                        a, b = (np.asarray(outputs[k], np.float32) for k in pair)
                        err = float(np.abs(a - b).max() / np.abs(b).max())
                errors = {"rel_err_vs_pallas": err} if fmt == "int4" else {"rel_err_vs_xla": err}
                row = record(
                    args.out, tokens=T, experts=fmt, impl=impl, backend=backend, ms=round(seconds * 1e3, 4),
                    bytes=int(need), distinct_experts=used, tb_s=round(need / seconds / 1e12, 3),
                    bw_ratio=round(need / seconds / bw, 3), tflop_s=round(flops / seconds / 1e12, 1),
                    mm_ratio=round(flops / seconds / rate, 3), bandwidth_tb_s=round(bw / 1e12, 3),
                    matmul_tflop_s=round(rate / 1e12, 1), **errors,
                )
                print(f"{T:>6} {fmt:>7} {impl:>15} {backend:>8} {row['ms']:>9.3f} {used:>6} {need / 1e9:>6.2f} "
                      f"{row['tb_s']:>6.2f} {100 * row['bw_ratio']:>5.1f} {row['tflop_s']:>8.1f} "
                      f"{100 * row['mm_ratio']:>5.1f} {'' if err is None else f'{err:.1e}':>8}", flush=True)
        del moe, state, steps


if __name__ == "__main__":
    main()
