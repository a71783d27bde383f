"""``kimi-jax demo``: write a tiny random K2.5 checkpoint, convert, load and run it."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kimi_jax.cli.common import CONTROL_ESCAPES


def run(args: argparse.Namespace) -> None:
    import numpy as np

    import kimi_jax
    from kimi_jax.chat.template import ChatTemplate
    from kimi_jax.checkpoint.summary import describe
    from kimi_jax.testing.demo import write_demo_checkpoint, write_demo_image

    work = Path(args.dir).expanduser().resolve() if args.dir else Path(tempfile.mkdtemp(prefix="kimi-jax-demo-"))
    hf, converted = work / "hf", work / "converted"
    print(f"1. writing a random K2.5-layout checkpoint with a tokenizer to {hf}")
    config = write_demo_checkpoint(hf, seed=args.seed)
    print(describe(kimi_jax.KimiConfig.from_dict(config)))
    print(f"2. converting it to {converted}")
    t0 = time.perf_counter()
    kimi_jax.convert(hf, converted, overwrite=True, progress=False)
    print(f"   done in {time.perf_counter() - t0:.1f}s")
    print("3. loading it and running a forward pass")
    model = kimi_jax.load(converted, dtype="float32", mesh=args.mesh)
    ids = np.random.default_rng(args.seed).integers(0, 400, size=(2, 12))
    logits = np.asarray(model(ids))
    print(f"   input_ids {ids.shape} -> logits {logits.shape}; next-token argmax {logits[:, -1].argmax(-1).tolist()}")
    model.set_moe_impl("reference")
    diff = np.abs(np.asarray(model(ids)) - logits).max()
    print(f"   grouped vs reference MoE path: max |diff| = {diff:.2e}")
    model.set_moe_impl("grouped")
    print("4. generating a reply to a chat (random weights, so the text is gibberish)")
    chat = [{"role": "user", "content": "Hello! What is the answer?"}]
    print(f"   prompt: {ChatTemplate.from_dir(converted).render(chat, thinking=False)}")
    t0 = time.perf_counter()
    [result] = kimi_jax.generate(model, [chat], tokenizer=converted, mode="instant", max_new_tokens=24, seed=args.seed)
    print(f"   output: {result.text.translate(CONTROL_ESCAPES)}")
    print(f"   {len(result.token_ids)} tokens ({result.finish_reason}) in {time.perf_counter() - t0:.1f}s")
    image = write_demo_image(work / "picture.png")
    print(f"5. asking about a synthetic picture, {image} (through the vision tower)")
    question = "What is in this picture?"
    chat = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]}]
    t0 = time.perf_counter()
    [result] = kimi_jax.generate(model, [chat], tokenizer=converted, mode="instant", max_new_tokens=24, seed=args.seed)
    media = result.prompt_ids.count(model.config.media_placeholder_token_id)
    print(f"   prompt: {len(result.prompt_ids)} tokens, {media} of them the picture's vision features")
    print(f"   output: {result.text.translate(CONTROL_ESCAPES)}")
    print(f"   {len(result.token_ids)} tokens ({result.finish_reason}) in {time.perf_counter() - t0:.1f}s")
    print(f"   next: kimi-jax generate {converted} --prompt {question!r} --image {image} --mode instant")


def register(sub) -> None:
    p = sub.add_parser("demo", help="write a tiny random K2.5 checkpoint, convert, load and run it")
    p.add_argument("--dir", help="working folder (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", help="run the demo model on this mesh layout (e.g. data=1,expert=1,tensor=1)")
    p.set_defaults(func=run)
