"""``kimi-jax bench moe`` (``kimi_jax.bench.moe``) from the repository, with its rows going
to ``benchmarks/results/moe.jsonl``:

    PYTHONPATH=. python benchmarks/moe.py [--tokens 1 8 64 256 4096 16384] [--xla-max 256] [--table]
"""

from __future__ import annotations

import argparse

from floors import RESULTS

from kimi_jax.bench import moe


def main() -> None:
    parser = argparse.ArgumentParser(description=moe.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    moe.add_arguments(parser, RESULTS / "moe.jsonl")
    moe.run(parser.parse_args())


if __name__ == "__main__":
    main()
