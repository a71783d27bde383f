"""``kimi-jax demo``: convert the embedded trained model, chat with it in both modes and run
it as an agent that executes its own calculator calls."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kimi_jax.cli.common import CONTROL_ESCAPES

QUESTIONS = {"instant": "What is 37 * 12?", "thinking": "How many meters are in 250 centimeters?"}


def run(args: argparse.Namespace) -> None:
    import numpy as np

    import kimi_jax
    from kimi_jax.agents import Agent
    from kimi_jax.checkpoint.summary import describe
    from kimi_jax.cli.agent import EventPrinter
    from kimi_jax.testing.demo import CALCULATOR_MODEL, write_demo_image
    from kimi_jax.train import calculator

    work = Path(args.dir).expanduser().resolve() if args.dir else Path(tempfile.mkdtemp(prefix="kimi-jax-demo-"))
    converted = work / "converted"
    print(f"1. the embedded model: a tiny K2.5 trained by `kimi-jax train --recipe calculator`\n   ({CALCULATOR_MODEL})")
    print(describe(kimi_jax.KimiConfig.from_file(CALCULATOR_MODEL)))
    print(f"2. converting it to {converted}")
    t0 = time.perf_counter()
    kimi_jax.convert(CALCULATOR_MODEL, converted, overwrite=True, progress=False)
    print(f"   done in {time.perf_counter() - t0:.1f}s")
    print("3. loading it; the grouped MoE path against the reference path")
    model = kimi_jax.load(converted, dtype="float32", mesh=args.mesh)
    ids = np.random.default_rng(args.seed).integers(0, 384, size=(2, 12))
    logits = np.asarray(model(ids))
    model.set_moe_impl("reference")
    print(f"   logits {logits.shape}; max |grouped - reference| = {np.abs(np.asarray(model(ids)) - logits).max():.2e}")
    model.set_moe_impl("grouped")
    for step, mode in ((4, "instant"), (5, "thinking")):
        question = QUESTIONS[mode]
        print(f"\n{step}. {mode.capitalize()} mode: the model's own reply to {question!r}")
        chat = [{"role": "user", "content": question}]
        [reply] = kimi_jax.generate(model, [chat], tokenizer=converted, tools=calculator.TOOLS, mode=mode,
                                    temperature=0.0, max_new_tokens=192)
        print(f"   {reply.text.translate(CONTROL_ESCAPES)}")
        print("   ... and as an agent that runs the calculator call and gives the model the result:")
        t0 = time.perf_counter()
        result = Agent(model, [calculator.tool()], tokenizer=converted, mode=mode, max_steps=4, max_new_tokens=192,
                       temperature=0.0, on_event=EventPrinter("agent")).run(question)
        print(f"\n   [{result.finish_reason}: {len(result.steps)} steps, {len(result.tool_calls)} tool calls, "
              f"{time.perf_counter() - t0:.1f}s]")
    image = write_demo_image(work / "picture.png")
    print(f"\n6. a picture, {image}, through the vision tower (untrained: the reply shows the pipeline runs, "
          "not what is in the picture)")
    chat = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                         {"type": "text", "text": "What is in this picture?"}]}]
    [result] = kimi_jax.generate(model, [chat], tokenizer=converted, mode="instant", max_new_tokens=24, seed=args.seed)
    media = result.prompt_ids.count(model.config.media_placeholder_token_id)
    print(f"   prompt: {len(result.prompt_ids)} tokens, {media} of them the picture's vision features")
    print(f"   output: {result.text.translate(CONTROL_ESCAPES)}")
    print(f"   next: kimi-jax generate {converted} --prompt 'What is in this picture?' --image {image} --mode instant")


def register(sub) -> None:
    p = sub.add_parser("demo", help="convert the embedded trained model, chat with it and run it as an agent")
    p.add_argument("--dir", help="working folder (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", help="run the demo model on this mesh layout (e.g. data=1,expert=1,tensor=1)")
    p.set_defaults(func=run)
