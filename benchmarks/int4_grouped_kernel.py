"""The fused INT4 grouped matmul (``kimi_jax/kernels/int4_grouped.py``) at Kimi K2.5 sizes on one GPU.

In one run: the measured memory bandwidth, then for gate/up
([7168 -> 2048]) and down ([2048 -> 7168]) projections of 384 experts, token copies routed
like top-8 of 1, 8, 64, 256 tokens (random routing, fixed seed) and a prefill of 32768 copies:
the kernel's median ms per call, the bytes of the experts actually touched (int4 values +
bf16 scales of experts with rows), achieved TB/s and its ratio to the memory bandwidth; the
same for the existing reference path (``int4_ragged_dot``: dequantize all experts in HBM,
then stock ``jax.lax.ragged_dot``). A bf16 parity check against the reference is printed for
every shape. Writes one JSON line per measurement to ``--out``.

    python benchmarks/int4_grouped_kernel.py [--sweep] [--out results.jsonl]

Run from the repository root with ``PYTHONPATH=.`` or the package installed.
"""

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import floors
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kimi_jax.kernels import int4_grouped as ig
from kimi_jax.quant.formats import int4_ragged_dot

ROOT = Path(__file__).resolve().parent.parent

E, TOP_K = 384, 8
PROJ = {"gate_up": (2048, 7168), "down": (7168, 2048),  # (out, in)
        "joined": (4096, 7168)}  # gate and up as one projection: what one launch for both would read
INTERPRET = False  # --dry-run: tiny sizes through Pallas' interpreter (checks the script on a CPU)


def looped(matmul, xs, gss, q, s, iters):
    """Seconds per call with ``iters`` calls inside one jit, rotating over the input sets."""
    r = xs.shape[0]

    @jax.jit
    def run(xs, gss, q, s):
        def body(i, c):
            k = i % r
            y = matmul(xs[k], q, s, gss[k])
            return c + y[0, 0].astype(jnp.float32)

        return lax.fori_loop(0, iters, body, jnp.float32(0))

    jax.block_until_ready(run(xs, gss, q, s))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(run(xs, gss, q, s))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / iters


def routing(tokens, seed):
    """Top-8 of ``tokens`` tokens over 384 experts, uniformly at random: group sizes."""
    rng = np.random.default_rng(seed)
    choice = np.argsort(rng.random((tokens, E)), axis=1)[:, :TOP_K]
    return np.bincount(choice.ravel(), minlength=E).astype(np.int32)


def memory_bandwidth():
    return floors.memory_bandwidth(1 << (21 if INTERPRET else 31))


def max_rel(y, ref):
    y, ref = jnp.asarray(y, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))


def make_weights(out, inp, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    q = jax.random.bits(k1, (E, out, inp // 8), jnp.uint32)  # words of uniform int4 values
    s = jax.random.uniform(k2, (E, out, inp // 32), jnp.float32, 0.002, 0.02).astype(jnp.bfloat16)
    return jax.block_until_ready(q), jax.block_until_ready(s)


def sweep_configs(m):
    if m <= 2048:
        for bn, bk, st in ((32, 256, 4), (64, 256, 4), (64, 128, 6), (128, 256, 3), (64, 512, 3)):
            yield ig.Config(block_m=16, block_n=bn, block_k=bk, num_warps=4, num_stages=st)
        for bn, bk, w, st in ((64, 256, 4, 4), (32, 256, 4, 4), (128, 256, 4, 3), (64, 512, 4, 3), (128, 512, 8, 3),
                              (64, 1024, 4, 2), (256, 256, 8, 3)):
            yield ig.Config(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=st, planes=True)
        if m <= 64:  # decode: split-K shares each tile's k-blocks among more programs
            for bn, bk, w, st in ((64, 512, 4, 3), (64, 256, 4, 4), (128, 256, 4, 3)):
                for splits in (2, 4, 8):
                    yield ig.Config(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=st, planes=True,
                                    splits=splits)
            # one row per tile, multiply-adds in registers (no matrix units)
            for bn, bk, w, st, splits in ((64, 256, 4, 3, 1), (64, 256, 4, 3, 2), (32, 256, 4, 3, 2),
                                          (128, 256, 8, 3, 2), (64, 512, 4, 2, 2), (64, 256, 4, 4, 4),
                                          (32, 512, 4, 3, 4), (128, 128, 4, 4, 2), (32, 1024, 4, 2, 2),
                                          (16, 512, 2, 3, 2)):
                yield ig.Config(block_n=bn, block_k=bk, num_warps=w, num_stages=st, gemv=True, splits=splits)
    else:
        for bm, bn, bk, w, st in ((128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3)):
            yield ig.Config(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in ((128, 128, 128, 8, 3), (128, 128, 256, 8, 3), (64, 128, 256, 4, 3),
                                  (128, 256, 128, 8, 3)):
            yield ig.Config(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st, planes=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--prefill", type=int, default=32768, help="prefill token copies (0: skip)")
    p.add_argument("--sweep", action="store_true", help="try tile configs at 64 and prefill copies first")
    p.add_argument("--proj", nargs="+", default=["gate_up", "down"], choices=("gate_up", "down", "joined"),
                   help="projections measured (joined: gate and up read by one launch)")
    p.add_argument("--reference-max", type=int, default=2048, help="largest M for the reference path")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/int4_grouped_kernel.jsonl"))
    p.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dry_run:
        global E, PROJ, INTERPRET
        E, PROJ, INTERPRET = 16, {"gate_up": (64, 256), "down": (256, 64), "joined": (128, 256)}, True
        args.tokens, args.prefill = args.tokens[:2], min(args.prefill, 512)

    dev = jax.devices()[0]
    gpu = dev.device_kind
    date = datetime.date.today().isoformat()
    ref_fn, ref_name = int4_ragged_dot, "int4_ragged_dot"
    print(f"{gpu}, jax {jax.__version__}; {E} experts, top {TOP_K}; reference: {ref_name}", flush=True)
    t_start = time.perf_counter()
    bw = memory_bandwidth()
    print(f"memory bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    out_file = open(args.out, "w")

    def record(**kw):
        kw.update(gpu=gpu, date=date, jax=jax.__version__)
        rows.append(kw)
        out_file.write(json.dumps(kw) + "\n")
        out_file.flush()

    record(m=0, tokens=0, proj="copy", impl="copy", ms=None, bytes=None, tb_s=bw / 1e12, bw_ratio=1.0)

    shapes = [(8 * t, t) for t in args.tokens] + ([(args.prefill, args.prefill // TOP_K)] if args.prefill else [])
    best = {}
    for proj in args.proj:
        n_out, n_in = PROJ[proj]
        q, s = make_weights(n_out, n_in, seed=1 if proj == "down" else 0)
        layouts = {"words": q}
        if args.sweep:
            for m, tokens in shapes:
                if m not in (8, 512, args.prefill):
                    continue
                gs = jnp.asarray(routing(tokens, seed=100))
                x = jax.random.normal(jax.random.key(m), (m, n_in), jnp.bfloat16)
                for lname, qk in layouts.items():
                    results = []
                    for cfg in sweep_configs(m):
                        def fn(x, q, s, g, cfg=cfg):
                            return ig.int4_grouped_matmul(x, q, s, g, config=cfg, interpret=INTERPRET)

                        try:
                            if m > 2048:
                                sec = floors.median_seconds(jax.jit(fn), x, qk, s, gs, iters=5)
                            else:
                                sec = looped(fn, x[None], gs[None], qk, s, 50)
                        except Exception as exc:  # noqa: BLE001 - a config that does not compile
                            print(f"  sweep {proj} m={m} {lname} {cfg}: failed {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]}", flush=True)
                            continue
                        results.append((sec, cfg))
                        print(f"  sweep {proj} m={m} {lname} bm={cfg.block_m} bn={cfg.block_n} bk={cfg.block_k} "
                              f"w={cfg.num_warps} st={cfg.num_stages} planes={cfg.planes} splits={cfg.splits} "
                              f"gemv={cfg.gemv}: "
                              f"{sec * 1e3:.3f} ms", flush=True)
                    if results:
                        sec, cfg = min(results, key=lambda r: r[0])
                        best[(proj, m, lname)] = cfg
                        print(f"best {proj} m={m} {lname}: {cfg} {sec * 1e3:.3f} ms "
                              f"[{time.perf_counter() - t_start:.0f} s]", flush=True)

        for m, tokens in shapes:
            r = 4 if m <= 64 else 1
            gss = np.stack([routing(tokens, seed=100 + i) for i in range(r)])
            xs = jax.random.normal(jax.random.key(m), (r, m, n_in), jnp.bfloat16)
            gss_j = jnp.asarray(gss)
            need = np.mean([ig.expert_bytes(q, s, g) for g in gss])
            used = float(np.mean([np.count_nonzero(g) for g in gss]))
            flops = 2 * m * n_out * n_in
            iters = 200 if m <= 64 else (50 if m <= 2048 else 10)
            ref = None
            if m <= args.reference_max:
                ref = jax.jit(ref_fn)(xs[0], q, s, gss_j[0])
            else:  # stock ragged_dot runs out of memory here: check three experts directly
                pass
            for lname, qk in layouts.items():
                swept = 8 if m <= 64 else (512 if m <= 2048 else args.prefill)
                cfg = best.get((proj, swept, lname))
                cfg = ig.fit_config(cfg, n_out, n_in) if cfg else ig.default_config(m, E, n_out, n_in)

                def mm(x, q_, s_, g, cfg=cfg):
                    return ig.int4_grouped_matmul(x, q_, s_, g, config=cfg, interpret=INTERPRET)

                try:
                    y = jax.block_until_ready(jax.jit(mm)(xs[0], qk, s, gss_j[0]))
                except Exception as exc:  # noqa: BLE001
                    print(f"{proj} m={m} {lname} {cfg}: failed {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                    continue
                if ref is not None:
                    err = max_rel(y, ref)
                else:
                    ends = np.cumsum(gss[0])
                    errs = []
                    for e in np.flatnonzero(gss[0])[:3]:
                        a, b = ends[e] - gss[0][e], ends[e]
                        w = int4_ragged_dot(xs[0][a:b], q[e:e + 1], s[e:e + 1], jnp.asarray([b - a], jnp.int32))
                        errs.append(max_rel(y[a:b], w))
                    err = max(errs)
                sec = looped(mm, xs, gss_j, qk, s, iters) if m <= 2048 else floors.median_seconds(jax.jit(mm), xs[0], qk, s,
                                                                                     gss_j[0], iters=iters)
                record(m=m, tokens=tokens, proj=proj, impl=f"pallas-{lname}", ms=sec * 1e3, bytes=int(need),
                       tb_s=need / sec / 1e12, bw_ratio=need / sec / bw, experts=used, tflops=flops / sec / 1e12,
                       max_rel_err=err, config=dataclasses.asdict(cfg))
                print(f"{proj:>7} m={m:>5} {lname:>5} {sec * 1e3:8.3f} ms {need / 1e9:6.2f} GB "
                      f"{need / sec / 1e12:5.2f} TB/s ({need / sec / bw:4.0%})  {flops / sec / 1e12:6.1f} TFLOP/s"
                      f"  max rel err {err:.2e} [{time.perf_counter() - t_start:.0f} s]", flush=True)
            if ref is not None:
                try:
                    sec = looped(ref_fn, xs, gss_j, q, s, 5) if m <= 2048 else None
                    record(m=m, tokens=tokens, proj=proj, impl=ref_name, ms=sec * 1e3, bytes=int(need),
                           tb_s=need / sec / 1e12, bw_ratio=need / sec / bw, experts=used,
                           tflops=flops / sec / 1e12)
                    print(f"{proj:>7} m={m:>5} {ref_name} {sec * 1e3:8.3f} ms", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"{ref_name} m={m}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            del xs, ref
        del q, s, layouts

    print(f"\n{gpu}, jax {jax.__version__}, memory bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'proj':>7} {'tokens':>6} {'M':>6} {'experts':>7} {'impl':>16} {'ms':>8} {'GB':>6} {'TB/s':>5} "
          f"{'of bw':>5} {'TFLOP/s':>7} {'err':>8}")
    for r in rows[1:]:
        err = r.get("max_rel_err")
        print(f"{r['proj']:>7} {r['tokens']:>6} {r['m']:>6} {r['experts']:>7.0f} {r['impl']:>16} {r['ms']:8.3f} "
              f"{r['bytes'] / 1e9:6.2f} {r['tb_s']:5.2f} {r['bw_ratio']:5.0%} {r['tflops']:7.1f} "
              f"{'' if err is None else f'{err:.1e}':>8}")
    out_file.close()


if __name__ == "__main__":
    sys.exit(main())
