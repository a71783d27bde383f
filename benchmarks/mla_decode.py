"""The split-K MLA decode kernel (``kimi_jax/kernels/mla_decode.py``) at K2.5 sizes on one GPU.

In one run: the memory bandwidth (floors.memory_bandwidth), then for 4096, 32768 and
131072 cached tokens at batch 1 and 32 (one query per row, at the last cached slot; 64
heads, C = 512, R = 64, bf16 cache stacked [B, L, S, C]): ms per call of the kernel (its
defaults) and of the pure-JAX reference under jit, the floor (the visible cache slots' bytes
plus q, read once, over the memory bandwidth) and floor / ms for each, and the kernel's error
against the reference at layer 1 (``rel_err`` = ||kernel - ref|| / ||ref||, ``max_rel_err`` =
max |kernel - ref| / max |ref|). ``--sweep`` then times a small grid of block sizes, warps,
stages and splits at 32768 tokens, batch 1 and 32, and prints the best.

Timing: about 20 ms of floor time of calls (about 4 to 400) inside one jitted loop (no dispatch per
call), call i on layer i % L of the stack, so that every call reads a layer that is not in L2:
the stack holds L = max(2, enough layers to span 4x a 50 MB L2) layers (``layers`` in the
rows); the last call is on layer 1 and gives the error. The median of 5 loops, divided by the
calls (``ms``). The rows also give the GPU's busy time per call from a profile of the same
loop (``device_ms``: the kernel's two launches; the reference's every kernel), without the
gaps between launches: what a call costs inside a decode step that the host keeps fed. Combinations that would need more than 60 GB are skipped.

    PYTHONPATH=. python benchmarks/mla_decode.py [--sweep] [--out results.jsonl]

Each measurement is printed and appended to ``benchmarks/results/mla_decode.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from floors import RESULTS, device_name, median_seconds, memory_bandwidth, record
from jax import lax
from kernel_times import device_seconds

from kimi_jax.kernels import mla_decode as md

N, C, R = 64, 512, 64  # K2.5: heads, kv_lora_rank, qk_rope_head_dim
SCALE = 192**-0.5  # 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)
L2_BYTES = 50 << 20
MEMORY = 60e9
KERNELS = "mla_decode"  # the kernel's launches in a profile (the split and the combine)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    cached: int

    @property
    def layer_bytes(self) -> int:
        return self.batch * self.cached * (C + R) * 2

    @property
    def layers(self) -> int:
        return max(2, math.ceil(4 * L2_BYTES / self.layer_bytes))

    @property
    def floor_bytes(self) -> int:
        """The visible slots of one layer plus q (one query per row)."""
        return self.layer_bytes + self.batch * N * (C + R) * 2

    def fits(self) -> bool:  # the stack, plus the reference's temporaries (about 4 layer slices)
        return (self.layers + 4) * self.layer_bytes < MEMORY


def make_inputs(case: Case):
    B, S, L = case.batch, case.cached, case.layers
    keys = jax.random.split(jax.random.key(B * 7 + S), 4)

    @jax.jit
    def draw():
        normal = functools.partial(jax.random.normal, dtype=jnp.bfloat16)
        return (normal(keys[0], (B, 1, N, C)), normal(keys[1], (B, 1, N, R)),
                normal(keys[2], (B, L, S, C)), normal(keys[3], (B, L, S, R)))

    return (*draw(), jnp.full((B, 1), S - 1, jnp.int32))


def timed(fn, inputs, layers: int, floor_s: float, match: str | None = None) -> tuple[float, float, jax.Array]:
    """Seconds per call, the GPU's busy seconds per call (its kernels alone, without the gaps
    between launches) and the last call's output (layer 1): the median of 5 runs of a jitted loop of about 20 ms of
    floor time, call i on layer i % layers, then 3 runs under the profiler (the kernels whose
    names contain ``match`` if given)."""
    n = int(min(400, max(4, 0.02 // floor_s)))
    iters = n - n % layers + 2  # the last call, iters - 1, is on layer 1
    q, q_pe, c_kv, k_pe, positions = inputs

    @jax.jit
    def loop(q, q_pe, c_kv, k_pe, positions):
        def body(i, out):
            return fn(q, q_pe, c_kv, k_pe, i % layers, positions)

        return lax.fori_loop(0, iters, body, jnp.zeros(q.shape, jnp.float32))

    seconds = median_seconds(loop, q, q_pe, c_kv, k_pe, positions, iters=5) / iters
    busy, kernels = device_seconds(loop, q, q_pe, c_kv, k_pe, positions, calls=3, per_call=iters, match=match)
    if not busy:
        print(f"no kernel named {match!r} in the profile: {[name[:60] for name, _, _ in kernels[:8]]}", flush=True)
        busy = float("nan")
    return seconds, busy, loop(q, q_pe, c_kv, k_pe, positions)


def errors(out, ref) -> tuple[float, float]:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), "the kernel wrote non-finite values"
    return (float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
            float(np.abs(out - ref).max() / np.abs(ref).max()))


def kernel(**config):
    return functools.partial(md.mla_decode, scale=SCALE, **config)


def reference(q, q_pe, c_kv, k_pe, layer, positions):
    return md.mla_decode_reference(q, q_pe, c_kv, k_pe, layer, positions, scale=SCALE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep block sizes / warps / splits at 32K")
    parser.add_argument("--grid", type=json.loads, default=None,
                        help="the sweep's configs as a JSON list of mla_decode keyword dicts (default: a built-in grid)")
    parser.add_argument("--sweep-batch", type=int, nargs="+", default=[1, 32], help="the batches swept")
    parser.add_argument("--out", default=str(RESULTS / "mla_decode.jsonl"))
    args = parser.parse_args()
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("benchmarks/mla_decode.py times the Triton kernel: it needs a GPU")

    bw = memory_bandwidth()
    print(f"{device_name()}: memory bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    common = dict(bandwidth_tb_s=round(bw / 1e12, 3), heads=N, latent=C, rope=R, queries=1)
    table = []
    for cached in (4096, 32768, 131072):
        for batch in (1, 32):
            case = Case(batch, cached)
            if not case.fits():
                need = (case.layers + 4) * case.layer_bytes
                print(f"skip batch {batch} x {cached} tokens: about {need / 1e9:.0f} GB")
                continue
            inputs = make_inputs(case)
            floor = case.floor_bytes / bw
            ref_seconds, ref_busy, ref = timed(reference, inputs, case.layers, floor)
            seconds, busy, out = timed(kernel(), inputs, case.layers, floor, KERNELS)
            rel, max_rel = errors(out, ref)
            for impl, sec, dev, extra in (
                ("pallas", seconds, busy,
                 dict(splits=md.auto_splits(batch, N, cached), rel_err=rel, max_rel_err=max_rel)),
                ("reference", ref_seconds, ref_busy, {}),
            ):
                row = record(args.out, bench="mla_decode", impl=impl, batch=batch, cached=cached, layers=case.layers,
                             ms=round(sec * 1e3, 4), floor_ms=round(floor * 1e3, 4), floor_ratio=round(floor / sec, 3),
                             device_ms=round(dev * 1e3, 4), device_floor_ratio=round(floor / dev, 3),
                             **extra, **common)
                print(row, flush=True)
                table.append(row)
            del inputs, ref, out

    if args.sweep:
        for batch in args.sweep_batch:
            sweep(Case(batch, 32768), bw, args.out, common, args.grid)

    print(f"\n{'impl':>9} {'batch':>5} {'cached':>7} {'ms':>9} {'busy ms':>9} {'floor ms':>9} {'floor/ms':>8} "
          f"{'floor/busy':>10} {'rel err':>9}")
    for r in table:
        print(f"{r['impl']:>9} {r['batch']:>5} {r['cached']:>7} {r['ms']:>9.4f} {r['device_ms']:>9.4f} "
              f"{r['floor_ms']:>9.4f} {r['floor_ratio']:>8.3f} {r['device_floor_ratio']:>10.3f} "
              f"{r.get('rel_err', float('nan')):>9.2e}")


def sweep(case: Case, bw: float, path: str, common: dict, grid: list[dict] | None):
    """Block sizes, warps and stages around the defaults (or ``grid``), then splits around the best."""
    inputs = make_inputs(case)
    floor = case.floor_bytes / bw
    q, q_pe, c_kv, k_pe, positions = inputs
    ref = jax.jit(reference)(q, q_pe, c_kv, k_pe, 1, positions)
    grid = grid or [
        {},
        dict(block_s=16),
        dict(block_s=64, num_stages=2),
        dict(num_stages=2),
        dict(num_warps=4),
        dict(block_rows=64, block_c=256),
        dict(block_rows=64, block_c=256, block_s=16, num_stages=2),
    ]
    results = []

    def measure(config):
        try:
            seconds, busy, out = timed(kernel(**config), inputs, case.layers, floor, KERNELS)
            rel, _ = errors(out, ref)
        except Exception as e:  # a config can fail to compile (shared memory, registers)
            print(f"  {config}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return
        record(path, bench="mla_decode_sweep", batch=case.batch, cached=case.cached, layers=case.layers, config=config,
               ms=round(seconds * 1e3, 4), floor_ms=round(floor * 1e3, 4), floor_ratio=round(floor / seconds, 3),
               device_ms=round(busy * 1e3, 4), device_floor_ratio=round(floor / busy, 3), rel_err=rel, **common)
        print(f"  {config}: {seconds * 1e3:.4f} ms (GPU busy {busy * 1e3:.4f}), floor/ms {floor / seconds:.3f}, "
              f"rel err {rel:.1e}", flush=True)
        results.append((seconds, config))

    print(f"sweep: batch {case.batch}, {case.cached} tokens, floor {floor * 1e3:.4f} ms", flush=True)
    for config in grid:
        measure(config)
    if not results:
        return
    best = min(results, key=lambda r: r[0])[1]
    auto = md.auto_splits(case.batch, N, case.cached, block_rows=best.get("block_rows", md.BLOCK_ROWS),
                          block_s=best.get("block_s", md.BLOCK_S))
    for splits in sorted({max(1, auto // 2), 2 * auto} - {auto}):
        measure({**best, "splits": splits})
    seconds, config = min(results, key=lambda r: r[0])
    print(f"best at batch {case.batch}: {config} {seconds * 1e3:.4f} ms, floor/ms {floor / seconds:.3f}", flush=True)


if __name__ == "__main__":
    main()
