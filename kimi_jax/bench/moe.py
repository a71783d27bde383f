"""One MoE layer at Kimi K2.5's real sizes on one accelerator, against the measured floors.

384 routed experts of 7168 x 2048 (top 8), one shared expert, random weights, bf16
activations; INT4 experts (int4 values + one bf16 scale per 32 inputs), then bf16 experts
through each grouped-matmul backend of ``--bf16-backends`` (``kimi_jax.kernels.grouped``:
``xla``, stock ``ragged_dot``, up to ``--bf16-max`` tokens; ``tokamax``, its kernel).
After measuring the memory bandwidth and the bf16 matmul rate, for each token count and grouped
implementation (INT4: ``grouped-pallas``, the fused kernel; ``grouped-xla``, dequantize then
the grouped matmul, backend ``auto``) it reports the median ms of one jitted call of the whole
layer (router, routed experts, shared expert), the bytes a call must read at least (the
distinct chosen experts' weights, the router, the shared expert), the achieved TB/s and its
ratio to the memory bandwidth, and the TFLOP/s and its ratio to the matmul rate (the measure
for prefill sizes). The pallas output is compared with the XLA one, and bf16 tokamax with
bf16 xla (max relative error, bf16).

Each measurement is appended to ``--out`` as one JSON line (``tokens``, ``experts``: int4 or
bf16, ``impl``, ``backend``, ``ms``, ``bytes``, ``bw_ratio``, ``mm_ratio``, the floors, the
layer's sizes, ``gpu``, ``date``, ...; a failed one, e.g. out of memory, as a row with
``error``). ``--table`` prints the run's rows as a markdown table to paste into
``benchmarks/RESULTS.md``. transformers' ``DeepseekV3MoE`` (PyTorch, not a dependency of
kimi-jax) is measured by ``benchmarks/moe_torch_peer.py`` of a clone of the repository, in a
process of its own, appending to the same file.

It refuses to run without a GPU or TPU unless ``--allow-cpu`` is given; with the size
options (``--experts``, ``--hidden``, ``--moe-hidden``, ``--copy-bytes``, ``--matmul-size``)
and small ``--tokens`` it is a CPU smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.bench.floors import (
    device_name,
    matmul_rate,
    median_seconds,
    memory_bandwidth,
    record,
    require_accelerator,
)
from kimi_jax.cli.common import non_negative_int, positive_int, user_path
from kimi_jax.config.model import TextConfig, kimi_k25_config
from kimi_jax.kernels import grouped
from kimi_jax.model.moe import INT4_GROUP_SIZE, MoE

TOKENS = [1, 8, 64, 256, 4096, 16384]
"""Decode (1-256) and prefill (4096, 16384) token counts measured by default."""
COMPARED = [(("grouped-pallas", "auto"), ("grouped-xla", "auto")), (("grouped", "tokamax"), ("grouped", "xla"))]
"""(impl, backend) pairs whose outputs are compared: a kernel's, then XLA's (the error's scale)."""
PEER = "benchmarks/moe_torch_peer.py"


def _significant(x: float, digits: int = 3) -> float:
    """``x`` to ``digits`` significant digits (a CPU's tiny ratios stay above zero)."""
    return float(f"{x:.{digits}g}")


def add_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The benchmark's options (``kimi-jax bench moe`` and ``benchmarks/moe.py``); ``out`` is
    the default results file."""
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=TOKENS,
                        help=f"token counts to measure (default: {' '.join(map(str, TOKENS))})")
    parser.add_argument("--xla-max", type=positive_int, default=256,
                        help="largest token count for grouped-xla (it writes every expert in bf16 first)")
    parser.add_argument("--iters", type=positive_int, default=10, help="timed calls per measurement (median)")
    parser.add_argument("--impls", nargs="*", default=["grouped-pallas", "grouped-xla"],
                        choices=["grouped-pallas", "grouped-xla"], help="implementations for INT4 experts")
    parser.add_argument("--bf16-max", type=non_negative_int, default=256,
                        help="largest token count for bf16 experts through the xla backend (stock ragged_dot; "
                             "0: skip bf16 experts)")
    parser.add_argument("--bf16-backends", nargs="+", default=["xla", "tokamax"], choices=grouped.BACKENDS[1:],
                        help="grouped-matmul backends to measure bf16 experts with")
    parser.add_argument("--out", type=user_path, default=str(out),
                        help=f"JSON lines file the rows are appended to, its folder created (default: {out})")
    parser.add_argument("--table", action="store_true",
                        help="at the end, print the run's rows as a markdown table (for benchmarks/RESULTS.md)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on the CPU when JAX has no GPU or TPU (a smoke test: use small sizes and --tokens)")
    g = parser.add_argument_group("sizes", "smaller than the defaults for smoke tests")
    g.add_argument("--experts", type=positive_int, help="routed experts, >= 8 (default: K2.5's)")
    g.add_argument("--hidden", type=positive_int, help="model width, a multiple of 32 (default: K2.5's)")
    g.add_argument("--moe-hidden", type=positive_int, help="expert width, a multiple of 32 (default: K2.5's)")
    g.add_argument("--copy-bytes", type=positive_int, default=2 << 30,
                   help="bytes the memory bandwidth is measured over (default: 2 GiB)")
    g.add_argument("--matmul-size", type=positive_int, default=8192,
                   help="n of the n^3 bf16 matmul the matmul rate is measured on (default: 8192)")


def layer_config(args: argparse.Namespace) -> TextConfig:
    """K2.5's decoder config with the sizes the options give."""
    cfg = kimi_k25_config().text
    sizes = {"n_routed_experts": args.experts, "hidden_size": args.hidden, "moe_intermediate_size": args.moe_hidden}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in sizes.items() if v is not None})
    if cfg.n_routed_experts < cfg.num_experts_per_tok:
        raise ValueError(f"--experts must be >= the experts chosen per token ({cfg.num_experts_per_tok}), "
                         f"got {cfg.n_routed_experts}")
    for option, size in (("--hidden", cfg.hidden_size), ("--moe-hidden", cfg.moe_intermediate_size)):
        if size % INT4_GROUP_SIZE:
            raise ValueError(f"{option} must be a multiple of {INT4_GROUP_SIZE} (one INT4 scale per "
                             f"{INT4_GROUP_SIZE} inputs), got {size}")
    return cfg


def run(args: argparse.Namespace) -> list[dict]:
    """Measures the floors, then each expert format, implementation and token count; appends
    every row to ``args.out`` as it is measured and returns the rows."""
    require_accelerator(args.allow_cpu)
    cfg = layer_config(args)
    bw, rate = memory_bandwidth(args.copy_bytes), matmul_rate(args.matmul_size)
    floors = (f"{device_name()}, jax {jax.__version__}: memory {bw / 1e12:.2f} TB/s, "
              f"bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    print(floors)
    print(f"{'tokens':>6} {'experts':>7} {'impl':>15} {'backend':>8} {'ms':>9} {'chosen':>6} {'GB':>6} {'TB/s':>6} "
          f"{'bw %':>5} {'TFLOP/s':>8} {'mm %':>5} {'rel err':>8}")
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    # (format, bytes per expert, (impl, grouped-matmul backend) pairs); int4 rows: the backend of grouped-xla
    formats = [("int4", 3 * D * F * (4 + 16 / INT4_GROUP_SIZE) / 8, [(impl, "auto") for impl in args.impls])]
    if args.bf16_max:
        formats.append(("bf16", 3 * D * F * 2, [("grouped", backend) for backend in args.bf16_backends]))
    rows = []
    for fmt, per_expert, variants in formats:
        if variants:
            rows += _measure(cfg, fmt, per_expert, variants, args, bw, rate)
            gc.collect()  # the layer's weights (nnx modules hold reference cycles) before the next format's
    print(f"\n{len(rows)} rows appended to {args.out}. transformers' DeepseekV3MoE (PyTorch): "
          f"python {PEER} --out {Path(args.out).resolve()} in a clone of kimi-jax, in its own process.")
    if args.table:
        print(f"\n{floors}\n\n{markdown_table(rows)}")
    return rows


def _measure(cfg: TextConfig, fmt: str, per_expert: float, variants, args, bw: float, rate: float) -> list[dict]:
    """One expert format's rows: every token count through every (impl, backend) variant."""
    E, D, F, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    fixed = E * D * 2 + 3 * D * cfg.shared_intermediate_size * 2  # router + shared expert, bf16
    sizes = dict(routed_experts=E, hidden_size=D, moe_hidden_size=F)
    def make():
        return MoE(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), expert_format="int4" if fmt == "int4" else "dense")

    # initialized in one compiled program: eagerly, each float32 draw (22.5 GB for a bf16
    # projection at K2.5 sizes) would be held beside its bf16 copy
    state = jax.block_until_ready(jax.jit(lambda: nnx.state(make()))())
    moe = nnx.merge(nnx.graphdef(nnx.eval_shape(make)), state)
    route = jax.jit(lambda x: moe.gate(x)[1])
    steps = {}
    for impl, backend in variants:
        moe.set_impl(impl)
        graphdef = nnx.graphdef(moe)
        steps[impl, backend] = jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x))
    rows = []
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
                rows.append(record(args.out, tokens=T, experts=fmt, impl=impl, backend=backend,
                                   error=str(e).splitlines()[0][:300], **sizes))
                continue
            err = None
            for pair in COMPARED:
                if (impl, backend) in pair and all(k in outputs for k in pair):
                    a, b = (np.asarray(outputs[k], np.float32) for k in pair)
                    err = float(np.abs(a - b).max() / np.abs(b).max())
            errors = {"rel_err_vs_pallas": err} if fmt == "int4" else {"rel_err_vs_xla": err}
            row = record(
                args.out, tokens=T, experts=fmt, impl=impl, backend=backend, ms=round(seconds * 1e3, 4),
                bytes=int(need), distinct_experts=used, tb_s=_significant(need / seconds / 1e12),
                bw_ratio=_significant(need / seconds / bw), tflop_s=_significant(flops / seconds / 1e12),
                mm_ratio=_significant(flops / seconds / rate), bandwidth_tb_s=round(bw / 1e12, 3),
                matmul_tflop_s=round(rate / 1e12, 1), **errors, **sizes,
            )
            rows.append(row)
            print(f"{T:>6} {fmt:>7} {impl:>15} {backend:>8} {row['ms']:>9.3f} {used:>6} {need / 1e9:>6.2f} "
                  f"{row['tb_s']:>6.2f} {100 * row['bw_ratio']:>5.1f} {row['tflop_s']:>8.1f} "
                  f"{100 * row['mm_ratio']:>5.1f} {'' if err is None else f'{err:.1e}':>8}", flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows :func:`run` returns as a markdown table, one line each (decode sizes are read
    against the memory bandwidth, prefill sizes against the matmul rate)."""
    lines = ["| tokens | experts | impl | backend | ms | distinct experts | GB | TB/s | of memory bw | TFLOP/s "
             "| of matmul | rel err |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = [r["tokens"], r["experts"], r["impl"], r["backend"]]
        if "error" in r:
            cells += ["failed: " + r["error"][:100].replace("|", "\\|")] + [""] * 7
        else:
            err = r.get("rel_err_vs_pallas", r.get("rel_err_vs_xla"))
            cells += [f"{r['ms']:.3f}", r["distinct_experts"], f"{r['bytes'] / 1e9:.2f}", f"{r['tb_s']:.2f}",
                      f"{100 * r['bw_ratio']:.0f}%", f"{r['tflop_s']:.1f}", f"{100 * r['mm_ratio']:.0f}%",
                      "" if err is None else f"{err:.1e}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
