"""Where an engine decode step's time goes: GPU kernels by name, per step, from a JAX profile.

Builds a K2.5 cut (``--layers``, INT4 experts, random weights), starts an engine of each
``--slots`` with one request decoding, then

- times the decode step synchronously (blocked each step) and pipelined (the engine's own
  overlap of host and device), and the host's time to dispatch a step;
- records ``--steps`` engine steps with ``jax.profiler`` and sums the GPU kernels of the trace
  by name: launches and microseconds per decode step, and the device's busy time against the wall;
- with ``--sources``, names beside each kernel the JAX operation and source line it runs
  (from the optimized HLO that XLA dumps of the decode step, ``kimi_jax.bench.hlo_sources``).

Every time is per decode step (an engine step of a ``--burst`` engine runs that many).

    PYTHONPATH=. python benchmarks/profile_decode.py [--layers 8] [--slots 64 1] [--top 40]

Prints tables and appends one JSON line per engine to ``benchmarks/results/profile.jsonl``;
``--trace-dir`` keeps the raw profile (and, with ``--sources``, the HLO dump in its ``hlo``
folder: the kernels XLA emits without a fusion, such as copies, are found there by hand).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from engine import text_config
from floors import RESULTS, record
from kernel_times import kernel_table

from kimi_jax.bench.hlo_sources import kernel_sources
from kimi_jax.inference.engine import Engine
from kimi_jax.testing.models import random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--slots", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--every-slot", action="store_true",
                        help="also profile each engine with one decode bucket: every slot computed each step")
    parser.add_argument("--length", type=int, default=2304)
    parser.add_argument("--steps", type=int, default=10, help="engine steps profiled")
    parser.add_argument("--burst", type=int, nargs="+", default=[1, 4],
                        help="the engines' decode_burst (decode steps per dispatch); times are per decode step")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="the request's top_p (below 1: sampled at temperature 1 through the top-p filter)")
    parser.add_argument("--top", type=int, default=40, help="kernels printed and recorded")
    parser.add_argument("--trace-dir", help="keep the raw profile (and the HLO dump of --sources) here "
                                            "(default: a temporary folder)")
    parser.add_argument("--sources", action="store_true",
                        help="name each kernel's JAX operation and source line (dumps the step's optimized HLO)")
    parser.add_argument("--tiny", action="store_true", help="shrink the widths (CPU smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "profile.jsonl"))
    args = parser.parse_args()
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if args.sources:  # before the first computation creates the backend, which reads the flags
        dump = None if args.trace_dir else tempfile.TemporaryDirectory()
        dump_dir = f"{args.trace_dir}/hlo" if args.trace_dir else dump.name
        os.environ["XLA_FLAGS"] = (f"{xla_flags} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text "
                                   "--xla_dump_hlo_module_re=.*decode_step.*").strip()

    config = text_config(args.layers, args.tiny)
    model = random_model(config, expert_format="int4")
    prompt = np.random.default_rng(0).integers(0, config.text.vocab_size, 128).tolist()
    runs = [(slots, None, burst) for slots in args.slots for burst in args.burst]
    if args.every_slot:
        runs += [(slots, (slots,), 1) for slots in args.slots if slots > 1]
    for slots, buckets, burst in runs:
        engine = Engine(model, max_slots=slots, max_length=args.length, prefill_chunk=256, decode_buckets=buckets,
                        decode_burst=burst)
        request = engine.submit(prompt, max_new_tokens=10**6 if not args.tiny else 200,
                                temperature=1.0 if args.top_p < 1 else 0.0, top_p=args.top_p)
        while len(request.token_ids) < 3:
            engine.step()
        synced = []
        for _ in range(20):
            t0 = time.perf_counter()
            engine.step()
            jax.block_until_ready(engine._slots.last)
            synced.append(time.perf_counter() - t0)
        dispatch, launch = [], []
        decode = engine._decode

        def timed(*call):  # the host's time to hand the decode program to the device
            t1 = time.perf_counter()
            out = decode(*call)
            launch.append(time.perf_counter() - t1)
            return out

        engine._decode = timed
        t0 = time.perf_counter()
        for _ in range(20):
            t1 = time.perf_counter()
            engine.step()
            dispatch.append(time.perf_counter() - t1)
        jax.block_until_ready(engine._slots.last)
        pipelined = (time.perf_counter() - t0) / 20
        engine._decode = decode
        trace_dir = args.trace_dir or tempfile.mkdtemp()
        trace_dir = f"{trace_dir}/slots{slots}-buckets{'-'.join(map(str, engine.decode_buckets))}"
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            engine.step()
        jax.block_until_ready(engine._slots.last)
        jax.profiler.stop_trace()
        rows, busy, span, idle = kernel_table(trace_dir, args.steps * burst)
        ms = 1e3 * float(np.median(synced)) / burst
        pipelined /= burst
        dispatch, launch = np.asarray(dispatch) / burst, np.asarray(launch) / burst
        print(f"\n## {args.layers} layers, {slots} slots (decode buckets {engine.decode_buckets}, burst {burst}), "
              f"1 decoding (top_p {args.top_p}), per decode step: {ms:.3f} ms blocked, "
              f"{pipelined * 1e3:.3f} ms pipelined, host step {1e3 * float(np.median(dispatch)):.3f} ms "
              f"(decode dispatch {1e3 * float(np.median(launch)):.3f} ms); "
              f"GPU busy {busy / 1e3:.3f} ms of a {span / 1e3:.3f} ms span per step, "
              f"{sum(r[1] for r in rows):.0f} kernels per step")
        print("idle between kernels per step: " + ", ".join(f"{k} {v}" for k, v in idle.items()))
        sources = kernel_sources(dump_dir, [r[0] for r in rows], "decode_step") if args.sources else {}
        print("| us/step | launches/step | kernel | source |\n|---:|---:|---|---|")
        for name, n, us in rows[: args.top]:
            print(f"| {us:.1f} | {n:g} | {name[:120]} | {sources.get(name, '')} |")
        record(args.out, bench="profile", layers=args.layers, slots=slots, decode_buckets=engine.decode_buckets,
               decode_burst=burst, top_p=args.top_p, xla_flags=xla_flags,
               tiny=args.tiny, blocked_ms=round(ms, 3),
               pipelined_ms=round(pipelined * 1e3, 3), host_step_ms=round(1e3 * float(np.median(dispatch)), 3),
               decode_dispatch_ms=round(1e3 * float(np.median(launch)), 3),
               gpu_busy_ms=round(busy / 1e3, 3), gpu_span_ms=round(span / 1e3, 3), idle=idle,
               kernels_per_step=round(sum(r[1] for r in rows), 1),
               top=[[name[:120], n, round(us, 1), *([sources.get(name, "")] if args.sources else [])]
                    for name, n, us in rows[: args.top]])
        del engine
    if args.sources and dump is not None:
        dump.cleanup()


if __name__ == "__main__":
    main()
