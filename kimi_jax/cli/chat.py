"""``kimi-jax chat CKPT``: an interactive multi-turn chat on stdin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kimi_jax.cli.common import (
    ReplyPrinter,
    add_generation_options,
    check_images,
    checkpoint_preprocessor,
    checkpoint_tokenizer,
    generate_kwargs,
    user_message,
)


def run(args: argparse.Namespace) -> None:
    import kimi_jax
    from kimi_jax.checkpoint.load import checkpoint_info
    from kimi_jax.inference.generate import generation_stop_ids

    checkpoint = Path(args.checkpoint)
    checkpoint_info(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint, required=True)
    images = args.image or []
    check_images(checkpoint, images)
    preprocessor = checkpoint_preprocessor(checkpoint)
    model = kimi_jax.load(checkpoint, dtype=args.dtype, mesh=args.mesh)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {checkpoint} ({args.mode} mode); /image PATH attaches an image to your next message, "
          "/exit or end of input quits")
    turn = 0
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            print()
            return
        if line.startswith("/image"):
            path = line.removeprefix("/image").strip()
            try:
                check_images(checkpoint, [path])
            except ValueError as e:
                print(f"error: {e}")
                continue
            images.append(path)
            print(f"attached {path} to your next message")
            continue
        if not line.strip():
            continue
        history.append(user_message(line.rstrip("\n"), images))
        images = []
        printer = ReplyPrinter(tokenizer, parse=True, thinking=args.mode == "thinking")
        [result] = kimi_jax.generate(
            model, [history], tokenizer=tokenizer, preprocessor=preprocessor,
            seed=args.seed + turn, stop_ids=generation_stop_ids(checkpoint), on_token=printer.token,
            **generate_kwargs(args),
        )
        printer.close()
        history.append(result.parsed.to_message())
        turn += 1


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat on stdin (/image PATH attaches an image, /exit quits)")
    add_generation_options(p)
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--image", action="append", metavar="PATH", help="an image for the first message (repeatable)")
    p.set_defaults(func=run)
