"""Accuracy of a model trained by the ``calculator`` recipe on held-out questions, with the tool.

Greedy, in Thinking and Instant mode: the model's ``calculator`` call is parsed and run, its
result given back, and the final answer must contain the right number
(``kimi_jax.train.calculator.accuracy``). Prints both accuracies and appends one JSON line
per mode to ``--out``.

    kimi-jax train --recipe calculator --out runs/calculator
    python benchmarks/calculator_accuracy.py runs/calculator/model [--questions 200]
"""

from __future__ import annotations

import argparse
import time

from floors import RESULTS, record

import kimi_jax
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.train import calculator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a converted checkpoint (kimi-jax train writes OUT/model)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS / "calculator.jsonl"))
    args = parser.parse_args()
    model = kimi_jax.load(args.checkpoint)
    tokenizer = Tokenizer.from_dir(args.checkpoint)
    questions = calculator.held_out(args.questions)
    for thinking in (True, False):
        start = time.perf_counter()
        acc, records = calculator.accuracy(model, tokenizer, questions, thinking=thinking)
        mode = "thinking" if thinking else "instant"
        wrong = [r for r in records if not r["correct"]][:3]
        record(args.out, mode=mode, questions=len(questions), accuracy=acc,
               seconds=round(time.perf_counter() - start, 1), wrong_examples=wrong)
        print(f"{mode}: {acc:.1%} of {len(questions)} held-out questions", flush=True)


if __name__ == "__main__":
    main()
