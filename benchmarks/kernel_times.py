"""GPU kernel times from a JAX profile, for the benchmarks beside this file."""

from __future__ import annotations

import collections
import glob
import re
import shutil
import tempfile

import jax
from jax._src.lib import _profile_data


def kernel_table(trace_dir: str, steps: int) -> tuple[list[tuple[str, int, float]], float, float, dict]:
    """Kernels of the trace in ``trace_dir``: (name, launches per step, us per step) by time,
    the device's busy us per step, the us from its first kernel start to its last end per step,
    and the idle time between consecutive kernels per step by gap size (launch gaps under 3 us,
    3-20 us, longer: a device waiting on the host) with the device-to-host copies per step."""
    [path] = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    data = _profile_data.ProfileData.from_file(path)
    total, count = collections.Counter(), collections.Counter()
    spans, busy, d2h = [], 0.0, 0
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                total[event.name] += event.duration_ns / 1e3
                count[event.name] += 1
                busy += event.duration_ns / 1e3
                spans.append((event.start_ns, event.end_ns))
                d2h += bool(re.search(r"(?i)d2h|dtoh|device ?to ?host", event.name))
    rows = [(name, count[name] / steps, us / steps) for name, us in total.most_common()]
    spans.sort()
    span = (spans[-1][1] - spans[0][0]) / 1e3 / steps if spans else 0.0
    gaps = {"under_3us": [0, 0.0], "3_20us": [0, 0.0], "over_20us": [0, 0.0]}
    end = spans[0][1] if spans else 0
    for start, stop in spans[1:]:
        gap = (start - end) / 1e3
        if gap > 0:
            key = "under_3us" if gap < 3 else "3_20us" if gap < 20 else "over_20us"
            gaps[key][0] += 1
            gaps[key][1] += gap
        end = max(end, stop)
    idle = {f"{key}_count": round(n / steps, 1) for key, (n, _) in gaps.items()}
    idle.update({f"{key}_us": round(us / steps, 1) for key, (_, us) in gaps.items()})
    idle["d2h_copies"] = round(d2h / steps, 2)
    return rows, busy / steps, span, idle


def device_seconds(fn, *args, calls: int = 10, per_call: int = 1,
                   match: str | None = None) -> tuple[float, list[tuple[str, int, float]]]:
    """The GPU's busy seconds per call of ``fn(*args)`` (the sum of its kernels' durations, no
    launch gaps: what a call costs inside a longer program that the host keeps fed), from a
    profile of ``calls`` calls dispatched back to back after a warm-up call, divided by
    ``per_call`` more (a ``fn`` that loops); only the kernels whose name contains ``match``
    if given (a loop's own counters left out); with the kernel table per call."""
    jax.block_until_ready(fn(*args))
    trace_dir = tempfile.mkdtemp()
    try:
        jax.profiler.start_trace(trace_dir)
        out = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        rows, busy, _, _ = kernel_table(trace_dir, calls * per_call)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    if match is not None:
        busy = sum(us for name, _, us in rows if match in name)
    return busy / 1e6, rows
