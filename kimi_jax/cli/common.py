"""Pieces the commands share: option groups, checkpoint side files, the reply printer."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

# ------------------------------------------------------------------ errors


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that report bad input or a failing environment, not a bug: shown as their message.

    Files and folders (``OSError``: missing, unreadable, read-only, a file where a folder is
    expected), bad values and malformed files (``ValueError``, so ``json.JSONDecodeError`` too),
    checkpoint storage and devices (orbax / tensorstore / XLA raise ``ValueError`` or
    ``RuntimeError``), chat templates (``jinja2.TemplateError``), and running out of memory.
    """
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, MemoryError)
    try:
        from jinja2 import TemplateError
    except ImportError:
        return errors
    return (*errors, TemplateError)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def error_message(e: Exception) -> str:
    """One line for an error: its message for bad input, its type and a hint for anything else."""
    if isinstance(e, _user_errors()) and not isinstance(e, RecursionError):
        return _one_line(e)
    return f"{type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)"


# ------------------------------------------------------------------ option types
# argparse ``type=`` callables: a bad value is argparse's usual error (exit 2), raised while the
# command line is parsed, so before any model or checkpoint is loaded.


def _number(kind, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _option(name: str, kind, what: str, ok, rule: str):
    """An argparse type: the text as ``kind`` (``what`` says which), refused unless ``ok(value)``
    with "must be ``rule``"."""

    def parse(text: str):
        value = _number(kind, text, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = name
    return parse


temperature = _option("temperature", float, "a number >= 0 (0 = greedy)", lambda v: v >= 0, ">= 0 (0 = greedy)")
top_p = _option("top_p", float, "a number in (0, 1]", lambda v: 0 < v <= 1, "in (0, 1]")
non_negative_int = _option("non_negative_int", int, "an integer >= 0", lambda v: v >= 0, ">= 0")
positive_int = _option("positive_int", int, "an integer >= 1", lambda v: v >= 1, ">= 1")
seconds = _option("seconds", float, "a number of seconds >= 0", lambda v: v >= 0, ">= 0 seconds")


SEED_LIMIT = 2**32


def seed(text: str) -> int:
    value = _number(int, text, f"an integer in [0, {SEED_LIMIT})")
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {SEED_LIMIT}), got {text}")
    return value


def user_path(text: str) -> str:
    """A path as typed: ``~`` expanded; relative paths stay relative to the working folder."""
    return os.path.expanduser(text)


def checkpoint_path(text: str) -> Path:
    """A checkpoint folder: ``~`` expanded, a relative path made absolute (the loaders want absolute paths)."""
    return Path(os.path.expanduser(text)).absolute()


# ------------------------------------------------------------------ option groups


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument("--mesh", help="mesh layout: a name (gpu-2, gpu-8, cpu-8, ...), a TOML file, or inline "
                                  "data=1,expert=4,tensor=2 (default: one device)")
    g.add_argument("--coordinator", help="multi-process: host:port of process 0 (or env KIMI_JAX_COORDINATOR)")
    g.add_argument("--num-processes", type=positive_int,
                   help="multi-process: number of processes (KIMI_JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=non_negative_int,
                   help="multi-process: this process's index (KIMI_JAX_PROCESS_ID)")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    add_parallel_options(p)
    p.add_argument("checkpoint", type=checkpoint_path, help="converted checkpoint folder")
    p.add_argument("--mode", default="thinking", choices=["thinking", "instant"])
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help=">= 1 (default: 512)")
    p.add_argument("--temperature", type=temperature,
                   help=">= 0, 0 = greedy (default: the mode's recommendation, thinking 1.0, instant 0.6)")
    p.add_argument("--top-p", type=top_p, help="in (0, 1] (default: the mode's recommendation, 0.95)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help=">= 0, 0 = off")
    p.add_argument("--seed", type=seed, default=0, help="an integer in [0, 2**32) (default: 0)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="parameters and activations (default: the checkpoint's)")
    p.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prefill-chunk", type=positive_int, default=512, help="prompt tokens per prefill step, >= 1")


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


def add_video_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--video PATH`` (repeatable) and the sampling options that apply to every video."""
    from kimi_jax.media.video import DEFAULT_MAX_FRAMES

    g = p.add_argument_group("video")
    g.add_argument("--video", action="append", metavar="PATH", type=user_path,
                   help=f"a video file to ask about (mp4, webm, mov, ...; repeatable), {what}; sampled at the "
                        "preprocessor's sample_fps (2 per second for K2.5) in chunks of 4 frames")
    g.add_argument("--video-start", type=seconds, metavar="SECONDS",
                   help="read the videos from this time on (default: their start)")
    g.add_argument("--video-end", type=seconds, metavar="SECONDS",
                   help="read the videos up to this time (default: their end)")
    g.add_argument("--video-max-frames", type=positive_int, default=DEFAULT_MAX_FRAMES, metavar="N",
                   help=f"frames sampled from one video at most (default {DEFAULT_MAX_FRAMES}); a longer video "
                        "gets N frames spread evenly over it, with a warning")


def video_part(path: str, args: argparse.Namespace) -> dict:
    """A chat ``video`` part for ``path`` with the command line's sampling options."""
    part = {"type": "video", "video": path}
    for key, value in (("start", args.video_start), ("end", args.video_end), ("max_frames", args.video_max_frames)):
        if value is not None:
            part[key] = value
    return part


def check_videos(checkpoint: Path, parts: list[dict]) -> None:
    """Fails early (before the model loads) on unreadable videos, ranges outside them, or a model
    without a vision tower."""
    from kimi_jax.config.model import KimiConfig
    from kimi_jax.media.video import check_video_range, probe_video

    if parts and not KimiConfig.from_file(checkpoint).is_multimodal:
        raise ValueError(f"{checkpoint} has no vision tower (its config has no vision_config); it takes no videos")
    for part in parts:
        check_video_range(probe_video(part["video"]), part.get("start"), part.get("end"))


def checkpoint_preprocessor(checkpoint: Path):
    """The checkpoint's media preprocessing config (K2.5's when it has no preprocessor_config.json)."""
    from kimi_jax.media.preprocess import PreprocessConfig

    if (checkpoint / "preprocessor_config.json").is_file():
        return PreprocessConfig.from_file(checkpoint)
    return PreprocessConfig.default()


def user_message(text: str, images: list[str], videos: list[dict] = ()) -> dict:
    """A user turn: the images (as image parts, first), the video parts, and the text."""
    if not images and not videos:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": path} for path in images] + list(videos)
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
