"""Pieces the commands share: option groups, checkpoint side files, the reply printer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument("--mesh", help="mesh layout: a name (gpu-2, gpu-8, cpu-8, ...), a TOML file, or inline "
                                  "data=1,expert=4,tensor=2 (default: one device)")
    g.add_argument("--coordinator", help="multi-process: host:port of process 0 (or env KIMI_JAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int, help="multi-process: number of processes (KIMI_JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="multi-process: this process's index (KIMI_JAX_PROCESS_ID)")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    add_parallel_options(p)
    p.add_argument("checkpoint", help="converted checkpoint folder")
    p.add_argument("--mode", default="thinking", choices=["thinking", "instant"])
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, help="default: the mode's recommendation (thinking 1.0, instant 0.6)")
    p.add_argument("--top-p", type=float, help="default: the mode's recommendation (0.95)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="parameters and activations (default: the checkpoint's)")
    p.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill step")


def token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


def checkpoint_tokenizer(checkpoint: Path, *, required: bool):
    """The checkpoint's tokenizer (with its chat template); None if it has none and none is required."""
    from kimi_jax.chat.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_dir(checkpoint)
    except FileNotFoundError as e:
        if not required:
            return None
        raise ValueError(
            f"{e}: text prompts need the checkpoint's tokenizer (convert from a folder that has "
            "tiktoken.model and tokenizer_config.json), or pass token ids with --ids 1,2,3"
        ) from None
    return tokenizer


def generate_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, prefill_chunk=args.prefill_chunk, cache_dtype=args.cache_dtype,
    )


def check_images(checkpoint: Path, paths: list[str]) -> None:
    """Fails early (before the model loads) on unreadable images or a model without a vision tower."""
    from kimi_jax.config.model import KimiConfig
    from kimi_jax.media.preprocess import load_image

    if paths and not KimiConfig.from_file(checkpoint).is_multimodal:
        raise ValueError(f"{checkpoint} has no vision tower (its config has no vision_config); it takes no images")
    for path in paths:
        load_image(path)


def checkpoint_preprocessor(checkpoint: Path):
    """The checkpoint's media preprocessing config (K2.5's when it has no preprocessor_config.json)."""
    from kimi_jax.media.preprocess import PreprocessConfig

    if (checkpoint / "preprocessor_config.json").is_file():
        return PreprocessConfig.from_file(checkpoint)
    return PreprocessConfig.default()


def user_message(text: str, images: list[str]) -> dict:
    """A user turn: the images (as image parts, first) and the text."""
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": path} for path in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if c not in (0x09, 0x0A)}
"""Control characters (but tab and newline) shown escaped, so random output cannot drive the terminal."""


class ReplyPrinter:
    """Streams one reply to stdout as its tokens arrive.

    With ``parse`` the output is split as a chat reply: reasoning under ``[thinking]`` (dimmed
    on a terminal), the answer under ``[answer]``, then ``[tool calls]``. Without a tokenizer
    the token ids are printed.
    """

    def __init__(self, tokenizer, *, parse: bool, thinking: bool):
        from kimi_jax.chat.parser import StreamParser
        from kimi_jax.inference.generate import TextDecoder

        self.decoder = TextDecoder(tokenizer) if tokenizer is not None else None
        self.parser = StreamParser(thinking=thinking) if parse else None
        self.section: str | None = None
        self.dim = sys.stdout.isatty()

    def token(self, index: int, token_id: int) -> None:
        """The ``on_token`` callback of :func:`kimi_jax.generate` (one prompt, so ``index`` is 0)."""
        if self.decoder is None:
            self._write(None, f"{token_id} ")
        else:
            self._text(self.decoder.push(token_id))

    def close(self) -> None:
        if self.decoder is not None:
            self._text(self.decoder.flush())
        if self.parser is not None:
            self._show(self.parser.close())
        print(flush=True)

    def _text(self, text: str) -> None:
        if self.parser is None:
            self._write(None, text)
        else:
            self._show(self.parser.feed(text))

    def _show(self, delta) -> None:
        self._write("thinking", delta.reasoning)
        self._write("answer", delta.content)
        for call in delta.tool_calls:
            error = f"  ({call.error})" if call.error else ""
            self._write("tool calls", f"{call.name} {call.raw_arguments}{error}\n")

    def _write(self, section: str | None, text: str) -> None:
        if not text:
            return
        if section != self.section:
            sys.stdout.write(("\n" if self.section else "") + f"[{section}]\n")
            self.section = section
        text = text.translate(CONTROL_ESCAPES)
        sys.stdout.write(f"\x1b[2m{text}\x1b[0m" if self.dim and section == "thinking" else text)
        sys.stdout.flush()
