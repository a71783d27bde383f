"""One layer's projection out of a stack of weights at K2.5 sizes: the in-place kernel against XLA.

For each projection a cached decode step reads from a run's stack (q and kv down, q up,
o_proj, the router, the shared expert's gate / up / down) and a few row counts: us of
``kimi_jax.kernels.stacked_matmul`` and of XLA's ``x @ w[layer]`` (the slice, then the
dot), each against the floor of reading the layer's weights once at the measured memory
bandwidth, and the kernel's largest error relative to the reference. Then the same for MLA's
``kv_b_proj`` halves (``kimi_jax.kernels.stacked_heads``: fold the queries through the key half,
unfold the output through the value half) against XLA's einsum over the sliced layer. Then
the projections of one input that a step reads in one launch (``stacked_matmuls``: q and kv
down; the router with the shared expert's gate and up) against one launch apiece. All
times are the GPU's busy time per call (from a profile: these kernels take a few to a hundred
microseconds, about what one dispatch costs, so wall times would measure the host).

    PYTHONPATH=. python benchmarks/stacked_matmul.py [--rows 1 8 64] [--layers 3]

Rows are printed and appended to ``benchmarks/results/stacked_matmul.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from floors import RESULTS, device_name, memory_bandwidth, record
from kernel_times import device_seconds

from kimi_jax.kernels.stacked_heads import stacked_heads_matmul, stacked_heads_reference
from kimi_jax.kernels.stacked_matmul import stacked_matmul, stacked_matmul_reference, stacked_matmuls

# (name, K, N) of K2.5's projections as the kernel sees them (o_proj: heads x v_head inputs)
SHAPES = [("q_a_proj", 7168, 1536), ("kv_a_proj_with_mqa", 7168, 576), ("q_b_proj", 1536, 64 * 192),
          ("o_proj", 64 * 128, 7168), ("router", 7168, 384), ("shared gate / up", 7168, 2048),
          ("shared down", 2048, 7168)]
# projections of one input read in one launch: (name, K, their N)
TOGETHER = [("q_a + kv_a", 7168, (1536, 576)), ("router + shared gate + up", 7168, (384, 2048, 2048))]
# kv_b_proj [C, heads, nope + v] of K2.5, and its halves: (name, start, width, fold)
KV_B = (512, 64, 256)
HALVES = [("kv_b key half (fold)", 0, 128, True), ("kv_b value half (unfold)", 128, 128, False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--layers", type=int, default=3, help="layers in the stack")
    parser.add_argument("--out", default=str(RESULTS / "stacked_matmul.jsonl"))
    args = parser.parse_args()

    bw = memory_bandwidth()
    print(f"{device_name()}, jax {jax.__version__}: memory bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    kernel = jax.jit(stacked_matmul)
    xla = jax.jit(lambda x, w, layer: x @ w[layer])
    print("| projection | rows | kernel us | kernel / floor | XLA us | XLA / floor | max rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, K, N in SHAPES:
        w = jax.random.normal(jax.random.key(K + N), (args.layers, K, N), jnp.bfloat16) * 0.02
        floor = K * N * 2 / bw
        for M in args.rows:
            x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
            layer = jnp.int32(args.layers - 1)
            ref = np.asarray(stacked_matmul_reference(x, w, layer), np.float32)
            out = np.asarray(kernel(x, w, layer), np.float32)
            error = float(np.abs(out - ref).max() / np.abs(ref).max())
            us_kernel, us_xla = (1e6 * device_seconds(f, x, w, layer)[0] for f in (kernel, xla))
            row = record(args.out, bench="stacked_matmul", projection=name, rows=M, K=K, N=N,
                         kernel_device_us=round(us_kernel, 2), xla_device_us=round(us_xla, 2),
                         floor_us=round(floor * 1e6, 2), kernel_floor_ratio=round(floor * 1e6 / us_kernel, 3),
                         xla_floor_ratio=round(floor * 1e6 / us_xla, 3), max_rel_error=error,
                         bandwidth_tb_s=round(bw / 1e12, 3))
            print(f"| {name} | {M} | {us_kernel:.1f} | {row['kernel_floor_ratio']:.0%} | {us_xla:.1f} | "
                  f"{row['xla_floor_ratio']:.0%} | {error:.1e} |", flush=True)
        del w
    heads(args, bw)
    together(args, bw)


def heads(args, bw: float) -> None:
    """The kv_b_proj halves: kernel and XLA as the GPU's busy time per call."""
    C, G, W = KV_B
    w = jax.random.normal(jax.random.key(W), (args.layers, C, G, W), jnp.bfloat16) * 0.02
    layer = jnp.int32(args.layers - 1)
    print("| kv_b_proj half | rows | kernel us | kernel / floor | XLA us | XLA / floor | max rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, start, width, fold in HALVES:
        kernel = jax.jit(functools.partial(stacked_heads_matmul, start=start, width=width, fold=fold))
        spec = "mgp,cgp->mgc" if fold else "mgc,cgp->mgp"
        xla = jax.jit(lambda x, w, layer, spec=spec, start=start, width=width:
                      jnp.einsum(spec, x, w[layer][..., start:start + width]))
        floor = C * G * width * 2 / bw
        for M in args.rows:
            x = jax.random.normal(jax.random.key(M), (M, G, width if fold else C), jnp.bfloat16)
            ref = np.asarray(stacked_heads_reference(x, w, layer, start=start, width=width, fold=fold), np.float32)
            out = np.asarray(kernel(x, w, layer), np.float32)
            error = float(np.abs(out - ref).max() / np.abs(ref).max())
            us_kernel, us_xla = (1e6 * device_seconds(f, x, w, layer)[0] for f in (kernel, xla))
            row = record(args.out, bench="stacked_heads", projection=name, rows=M, C=C, heads=G, width=width,
                         kernel_device_us=round(us_kernel, 2), xla_device_us=round(us_xla, 2),
                         floor_us=round(floor * 1e6, 2), kernel_floor_ratio=round(floor * 1e6 / us_kernel, 3),
                         xla_floor_ratio=round(floor * 1e6 / us_xla, 3), max_rel_error=error,
                         bandwidth_tb_s=round(bw / 1e12, 3))
            print(f"| {name} | {M} | {us_kernel:.1f} | {row['kernel_floor_ratio']:.0%} | {us_xla:.1f} | "
                  f"{row['xla_floor_ratio']:.0%} | {error:.1e} |", flush=True)


def together(args, bw: float) -> None:
    """Projections of one input: one ``stacked_matmuls`` launch against a launch apiece."""
    layer = jnp.int32(args.layers - 1)
    print("| projections | rows | one launch us | one apiece us | floor us | max rel. error |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, K, Ns in TOGETHER:
        ws = [jax.random.normal(jax.random.key(K + n + i), (args.layers, K, n), jnp.bfloat16) * 0.02
              for i, n in enumerate(Ns)]
        one = jax.jit(lambda x, ws, layer: stacked_matmuls(x, ws, layer))
        apiece = jax.jit(lambda x, ws, layer: tuple(stacked_matmul(x, w, layer) for w in ws))
        floor = K * sum(Ns) * 2 / bw
        for M in args.rows:
            x = jax.random.normal(jax.random.key(M), (M, K), jnp.bfloat16)
            refs = [np.asarray(stacked_matmul_reference(x, w, layer), np.float32) for w in ws]
            error = max(float(np.abs(np.asarray(o, np.float32) - r).max() / np.abs(r).max())
                        for o, r in zip(one(x, ws, layer), refs, strict=True))
            us_one, us_apiece = (1e6 * device_seconds(f, x, ws, layer)[0] for f in (one, apiece))
            record(args.out, bench="stacked_matmuls", projections=name, rows=M, K=K, N=list(Ns),
                   one_launch_device_us=round(us_one, 2), one_apiece_device_us=round(us_apiece, 2),
                   floor_us=round(floor * 1e6, 2), max_rel_error=error, bandwidth_tb_s=round(bw / 1e12, 3))
            print(f"| {name} | {M} | {us_one:.1f} | {us_apiece:.1f} | {floor * 1e6:.1f} | {error:.1e} |", flush=True)
        del ws


if __name__ == "__main__":
    main()
