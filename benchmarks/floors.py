"""The measured floors (``kimi_jax.bench.floors``) for the scripts beside it, and the folder
their rows go to (``python benchmarks/NAME.py`` puts this folder on the path)."""

from __future__ import annotations

from pathlib import Path

from kimi_jax.bench.floors import (
    device_name,
    matmul_rate,
    median_seconds,
    memory_bandwidth,
    record,
)

RESULTS = Path(__file__).parent / "results"

__all__ = ["RESULTS", "memory_bandwidth", "device_name", "matmul_rate", "median_seconds", "record"]
