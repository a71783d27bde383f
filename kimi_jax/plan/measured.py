"""Measured efficiencies from the benchmark results (``benchmarks/results/*.jsonl``).

The engine benchmark (``benchmarks/engine.py``) records decode steps as rows with ``bench =
"decode"``, the ``batch``, ``floor_ratio`` (the step's floor time, bytes it must read over the
bandwidth measured in the same run, divided by the measured time) and that bandwidth
(``bandwidth_tb_s``). Against the catalog's bandwidth the engine's efficiency is
``floor_ratio * bandwidth_tb_s / catalog bandwidth``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kimi_jax.plan.hardware import Hardware

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
"""The repository's results folder (absent from an installed package: then nothing is measured)."""


def decode_efficiencies(hw: Hardware, folder: Path = RESULTS) -> dict[int, float]:
    """Decode efficiency against ``hw``'s catalog bandwidth by batch size, from the engine
    benchmark's rows recorded on this kind of device (the last row of each batch wins); empty
    when there are none."""
    found: dict[int, float] = {}
    for path in sorted(Path(folder).glob("*.jsonl")) if Path(folder).is_dir() else ():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line: {e}") from None
            if (row.get("bench") == "decode" and row.get("gpu") in hw.device_kinds and not row.get("tiny")
                    and row.get("floor_ratio") and row.get("bandwidth_tb_s")):
                found[int(row["batch"])] = row["floor_ratio"] * row["bandwidth_tb_s"] * 1e12 / hw.hbm_bytes_s
    return found


def nearest(efficiencies: dict[int, float], batch: int) -> float:
    """The efficiency measured at the batch size nearest to ``batch`` (by ratio)."""
    return efficiencies[min(efficiencies, key=lambda b: abs(math.log(b / batch)))]
