"""``kimi-jax bench moe``: the packaged benchmarks, on this machine's accelerator; rows are
appended to ``kimi-jax-results/`` in the working folder."""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path("kimi-jax-results")


def register(sub) -> None:
    from kimi_jax.bench import moe

    p = sub.add_parser("bench", help="measure on this machine's GPU or TPU: moe (one MoE layer at K2.5 sizes)")
    benches = p.add_subparsers(dest="bench", required=True)
    m = benches.add_parser("moe", help="one MoE layer at K2.5 sizes against the measured bandwidth and matmul rate",
                           description=moe.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    moe.add_arguments(m, RESULTS / "moe.jsonl")
    m.set_defaults(func=moe.run)
