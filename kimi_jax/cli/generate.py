"""``kimi-jax generate CKPT --prompt ...``: one reply, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kimi_jax.cli.common import (
    ReplyPrinter,
    add_generation_options,
    add_video_options,
    check_images,
    check_videos,
    checkpoint_preprocessor,
    checkpoint_tokenizer,
    generate_kwargs,
    token_ids,
    user_message,
    user_path,
    video_part,
)


def run(args: argparse.Namespace) -> None:
    import kimi_jax
    from kimi_jax.checkpoint.load import checkpoint_info
    from kimi_jax.inference.generate import generation_stop_ids

    checkpoint = Path(args.checkpoint)
    checkpoint_info(checkpoint)
    stop_ids = generation_stop_ids(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint, required=args.ids is None)
    images = args.image or []
    check_images(checkpoint, images)
    videos = [video_part(path, args) for path in args.video or []]
    is_chat = args.ids is None and not args.raw
    if videos and not is_chat:
        raise ValueError("--video needs a chat prompt (--prompt without --raw): the chat template places "
                         "the video's chunks and their timestamps")
    check_videos(checkpoint, videos)
    preprocessor = checkpoint_preprocessor(checkpoint)
    media = {}
    if is_chat:
        prompt = [user_message(args.prompt, images, videos)]
    else:
        prompt = args.prompt if args.ids is None else args.ids
        if images:  # the raw prompt holds the placeholders; the images fill them in order
            from kimi_jax.media.preprocess import preprocess_media

            media["pixel_values"], media["grid_thws"] = preprocess_media(images, preprocessor)
    model = kimi_jax.load(checkpoint, dtype=args.dtype, mesh=args.mesh)
    printer = ReplyPrinter(tokenizer, parse=is_chat, thinking=args.mode == "thinking")
    [result] = kimi_jax.generate(
        model, [prompt], tokenizer=tokenizer, preprocessor=preprocessor,
        seed=args.seed, stop_ids=stop_ids, on_token=printer.token,
        **media, **generate_kwargs(args),
    )
    printer.close()
    print(f"[{len(result.prompt_ids)} prompt tokens, {len(result.token_ids)} generated, {result.finish_reason}]",
          file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate from a prompt, streaming to the terminal")
    add_generation_options(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the user's message (sent as a one-turn chat unless --raw)")
    prompt.add_argument("--ids", type=token_ids, help="raw prompt token ids, e.g. 1,2,3 (no tokenizer needed)")
    p.add_argument("--raw", action="store_true", help="continue --prompt as plain text, without the chat template")
    p.add_argument("--image", action="append", metavar="PATH", type=user_path,
                   help="an image to ask about (repeatable); with --raw or --ids the prompt must hold one "
                        "<|media_pad|> placeholder per image")
    add_video_options(p, "with --prompt (not --raw or --ids)")
    p.set_defaults(func=run)
