"""What the hardware can do, measured in the same run as the numbers compared to it.

Benchmarks report ratios to these floors: the memory bandwidth (the fastest of a copy, a sum
and a vector-matrix product over 2 GiB by default) and the bf16 matmul rate (8192^3 by default).
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, iters: int = 20, stat=statistics.median) -> float:
    """Median (or ``stat``) wall time of ``fn(*args)`` (blocked on its outputs) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return stat(times)


def _seconds_per_call(fn, *args, calls: int = 10, repeats: int = 5) -> float:
    """Seconds per call of ``fn(*args)`` with ``calls`` calls dispatched back to back and
    blocked on once (the fastest of ``repeats``): one host round trip per ``calls``, not per
    call, so a read of a few hundred microseconds is not inflated by it."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):  # one stream: the last call ends after the others; each result is freed
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def memory_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Bytes per second the memory sustains: the largest of three reads of ``n_bytes``, each
    timed over calls dispatched back to back (:func:`_seconds_per_call`): a float32 copy
    (``x * 2``, bytes read + written), a float32 sum, and a bf16 vector-matrix product
    (``v @ m``, m ``[8192, n_bytes / 16 KiB]``: a decode step's projections read their
    weights this way).

    A copy alone understated it: on an H200 a bf16 copy moved 2.6-3.0 TB/s while the same
    run's lm_head read its 2.35 GB at 4.5 TB/s; on an H100 the copy and the sum gave 2.62
    TB/s while lm_head read at 3.09, so floors from them were too low. Timing each call with
    its own host round trip understated the product too: 2.81 TB/s on an H100 whose GPU clock
    gave the same product 3.19 TB/s.
    """
    x = jax.random.normal(jax.random.key(0), (n_bytes // 4,), jnp.float32)
    copy = 2 * n_bytes / _seconds_per_call(jax.jit(lambda a: a * 2), x)
    read = n_bytes / _seconds_per_call(jax.jit(jnp.sum), x)
    del x
    rows = 8192  # a short contraction over many outputs, as lm_head's 7168 x 163840
    m = jax.random.normal(jax.random.key(1), (rows, n_bytes // (2 * rows)), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), (1, rows), jnp.bfloat16)
    gemv = m.size * 2 / _seconds_per_call(jax.jit(jnp.matmul), v, m)
    return max(copy, read, gemv)


def matmul_rate(n: int = 8192) -> float:
    """bf16 FLOP/s of an ``n`` x ``n`` x ``n`` matmul (float32 accumulation)."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    seconds = median_seconds(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)), a, b)
    return 2 * n**3 / seconds


def device_name() -> str:
    return jax.devices()[0].device_kind


def require_accelerator(allow_cpu: bool) -> None:
    """Raises ``ValueError`` when JAX has no GPU or TPU, unless ``allow_cpu``."""
    if jax.default_backend() == "cpu" and not allow_cpu:
        raise ValueError("no GPU or TPU found (JAX's backend is cpu); the benchmark measures an accelerator "
                         "(--allow-cpu runs it on the CPU anyway: give it small --tokens and sizes)")


def record(path: str | Path, **fields) -> dict:
    """Appends one JSON line (with date, device and jax version) to ``path``, creating its
    folder; returns the row."""
    row = {"date": datetime.date.today().isoformat(), "gpu": device_name(), "jax": jax.__version__, **fields}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row
