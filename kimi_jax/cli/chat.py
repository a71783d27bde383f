"""``kimi-jax chat CKPT``: an interactive multi-turn chat on stdin.

A failing turn never ends the session: the error is printed as ``error: ...``, the failed
message (and the images and videos attached to it) is not kept, and the conversation goes on from the
history before it. A conversation that outgrows the model's context loses its oldest turns
(a turn: a user message and the replies to it; the system message stays) until the new
message fits, with a note; a message that does not fit even alone is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from kimi_jax.cli.common import (
    ReplyPrinter,
    add_generation_options,
    add_video_options,
    check_images,
    check_videos,
    checkpoint_preprocessor,
    checkpoint_tokenizer,
    error_message,
    generate_kwargs,
    positive_int,
    user_message,
    user_path,
    video_part,
)

CONTEXT_POLICY = (
    "A conversation that outgrows the model's context loses its oldest turns (the system message "
    "stays) until the new message fits, with a note; a message that does not fit even alone is refused. "
    "An error in a turn is printed and the session goes on without that message."
)

OUTGROWN = ("longer than the model's context", "longer than the cache")
"""How ``kimi_jax.generate`` reports a prompt that does not fit its engine."""


def _outgrows_context(e: Exception) -> bool:
    return isinstance(e, ValueError) and any(s in str(e) for s in OUTGROWN)


def _turn_starts(history: list[dict]) -> list[int]:
    """Where each turn of ``history`` (no system message) begins: at its user messages."""
    return [i for i, m in enumerate(history) if m.get("role") == "user"]


class Chat:
    """The conversation and one reply per user message, under the context policy."""

    def __init__(self, args: argparse.Namespace, model, tokenizer, preprocessor, stop_ids: list[int]):
        import jax.numpy as jnp

        import kimi_jax

        self.args, self.model, self.tokenizer = args, model, tokenizer
        # One slot kept across turns: a turn prefills only from where its prompt leaves the cached one.
        self.max_length = min(args.max_length, model.config.text.max_position_embeddings)
        self.engine = kimi_jax.Engine(model, max_slots=1, max_length=self.max_length,
                                      prefill_chunk=args.prefill_chunk, cache_dtype=jnp.dtype(args.cache_dtype))
        self.preprocessor, self.stop_ids = preprocessor, stop_ids
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict] = []  # the turns after the system message
        self.turn = 0

    def reply(self, message: dict) -> None:
        """Answers ``message``; on success it and the reply join the history (older turns may be
        dropped to make room), on an error the history is left as it was."""
        import kimi_jax

        starts = _turn_starts(self.history) + [len(self.history)]
        for dropped, start in enumerate(starts):  # drop 0, 1, ... of the oldest turns
            kept = self.history[start:]
            printer = ReplyPrinter(self.tokenizer, parse=True, thinking=self.args.mode == "thinking")
            note = f"[note: dropped the {dropped} oldest turn(s) to fit the model's context]\n" if dropped else ""

            def on_token(index: int, token_id: int, printer=printer) -> None:
                nonlocal note
                if note:  # the prompt fitted: say so before the reply
                    sys.stdout.write(note)
                    note = ""
                printer.token(index, token_id)

            try:
                [result] = kimi_jax.generate(
                    self.model, [self.system + kept + [message]], tokenizer=self.tokenizer,
                    preprocessor=self.preprocessor, seed=self.args.seed + self.turn, stop_ids=self.stop_ids,
                    on_token=on_token, engine=self.engine, **generate_kwargs(self.args),
                )
            except BaseException as e:
                self.engine.reset()  # the failed turn's request ends; the next turn prefills afresh
                if printer.section is not None:  # a reply broken off midway: end its line
                    print()
                elif _outgrows_context(e) and start < len(self.history):
                    continue
                elif _outgrows_context(e):
                    raise ValueError(f"message refused, it does not fit even without the earlier turns: {e}") from e
                raise
            printer.close()
            if result.finish_reason == "length" and len(result.prompt_ids) + len(result.token_ids) > self.max_length:
                print(f"[note: the reply was cut short at the end of the context ({self.max_length} tokens)]")
            self.history = kept + [message, result.parsed.to_message()]
            self.turn += 1
            return


def run(args: argparse.Namespace) -> None:
    import kimi_jax
    from kimi_jax.checkpoint.load import checkpoint_info
    from kimi_jax.inference.generate import generation_stop_ids

    checkpoint = Path(args.checkpoint)
    checkpoint_info(checkpoint)
    stop_ids = generation_stop_ids(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint, required=True)
    images = list(args.image or [])
    check_images(checkpoint, images)
    videos = [video_part(path, args) for path in args.video or []]
    check_videos(checkpoint, videos)
    preprocessor = checkpoint_preprocessor(checkpoint)
    model = kimi_jax.load(checkpoint, dtype=args.dtype, mesh=args.mesh)
    chat = Chat(args, model, tokenizer, preprocessor, stop_ids)
    print(f"chatting with {checkpoint} ({args.mode} mode); /image PATH or /video PATH attaches an image or a "
          "video to your next message, /exit or end of input quits")
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            print()
            return
        command, _, rest = line.strip().partition(" ")
        try:
            if command == "/image":
                if not rest.strip():
                    raise ValueError("usage: /image PATH")
                path = os.path.expanduser(rest.strip())
                check_images(checkpoint, [path])
                images.append(path)
                print(f"attached {path} to your next message")
                continue
            if command == "/video":
                if not rest.strip():
                    raise ValueError("usage: /video PATH")
                part = video_part(os.path.expanduser(rest.strip()), args)
                check_videos(checkpoint, [part])
                videos.append(part)
                print(f"attached {part['video']} to your next message")
                continue
            if not line.strip():
                continue
            message = user_message(line.rstrip("\n"), images, videos)
            images, videos = [], []  # a failed message takes its images and videos with it
            chat.reply(message)
        except Exception as e:  # noqa: BLE001 - one turn's error never ends the session
            sys.stdout.flush()
            if getattr(args, "debug", False):
                traceback.print_exc()
            print(f"error: {error_message(e)}", flush=True)


def register(sub) -> None:
    p = sub.add_parser(
        "chat", help="interactive multi-turn chat on stdin (/image PATH, /video PATH attach media, /exit quits)",
        description="Interactive multi-turn chat on stdin: /image PATH or /video PATH attaches an image or a video "
                    "(with the --video-* options) to your next message, /exit or end of input quits. "
                    + CONTEXT_POLICY,
    )
    add_generation_options(p)
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--max-length", type=positive_int, default=16384,
                   help="tokens the conversation may hold (default 16384, at most the model's context); the "
                        "cache keeps them between turns, so a turn prefills only from where its prompt "
                        "differs from the previous turn's (in thinking mode the template drops earlier "
                        "reasoning, so that is where the last reply began)")
    p.add_argument("--image", action="append", metavar="PATH", type=user_path,
                   help="an image for the first message (repeatable)")
    add_video_options(p, "for the first message")
    p.set_defaults(func=run)
