"""The ``kimi-jax`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _cmd_convert(args: argparse.Namespace) -> None:
    from kimi_jax.convert import convert

    if args.mesh:
        _check_layout_fits(args.src, args.mesh, args.dtype, args.dequantize)
    t0 = time.perf_counter()
    out = convert(args.src, args.dst, dtype=args.dtype, dequantize=args.dequantize, overwrite=args.overwrite,
                  progress=not args.quiet)
    print(f"converted {args.src} -> {out} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")


def _check_layout_fits(src: str, mesh: str, dtype: str, dequantize: bool) -> None:
    """Fails before converting when the layout cannot shard the model the conversion will
    produce (indivisible axes; INT4 experts' scales included)."""
    import jax
    from flax import nnx

    from kimi_jax.config import KimiConfig
    from kimi_jax.convert import DTYPES, SafetensorsSource, expert_format_of
    from kimi_jax.model import Kimi
    from kimi_jax.sharding import load_layout, state_shardings

    config, layout = KimiConfig.from_file(src), load_layout(mesh)
    experts = expert_format_of(SafetensorsSource(src), dequantize)
    abstract_mesh = jax.sharding.AbstractMesh(tuple(n for _, n in layout.axes), tuple(a for a, _ in layout.axes))
    model = nnx.eval_shape(lambda: Kimi(config, dtype=DTYPES[dtype], expert_format=experts))
    state_shardings(nnx.state(model), abstract_mesh, layout)
    print(f"mesh layout {layout.describe()} fits this model")


def _cmd_info(args: argparse.Namespace) -> None:
    from kimi_jax.checkpoint import checkpoint_info
    from kimi_jax.config import KimiConfig
    from kimi_jax.convert import DTYPES, INFO_FILE
    from kimi_jax.summary import (
        active_parameters, default_expert_format, describe, device_bytes, human_bytes, parameter_counts,
    )

    config = KimiConfig.from_file(args.path)
    print(describe(config))
    if (Path(args.path) / INFO_FILE).is_file():
        info = checkpoint_info(args.path)
        dtype, experts = info["dtype"], info.get("expert_format", "dense")
        print(f"checkpoint      kimi-jax: {dtype}, {experts} routed experts")
    else:
        dtype, experts = "bfloat16", default_expert_format(config)
        print(f"checkpoint      Hugging Face; the device sizes below are after `kimi-jax convert` "
              f"({dtype}, {experts} routed experts)")
    counts = parameter_counts(config)
    sizes = device_bytes(config, DTYPES[dtype], experts)
    total, total_bytes = sum(counts.values()), sum(sizes.values())
    print(f"\n{'decoder':18s}{'parameters':>20s}{'':8s}{'on the device':>14s}")
    for name, n in counts.items():
        print(f"  {name:16s}{n:>20,d}  {100 * n / total:5.1f}%{human_bytes(sizes[name]):>14s}")
    print(f"  {'total':16s}{total:>20,d}{'':8s}{human_bytes(total_bytes):>14s}")
    print(f"  {'active / token':16s}{int(active_parameters(config, counts)):>20,d}")
    if counts["routed_experts"]:
        bits = 8 * sizes["routed_experts"] / counts["routed_experts"]
        print(f"\nrouted experts  {bits:.2f} bits per parameter on the device"
              + (" (int4 values + one bfloat16 scale per 32)" if experts == "int4" else ""))
    if args.mesh:
        from kimi_jax.sharding import load_layout
        from kimi_jax.summary import bytes_per_device

        layout = load_layout(args.mesh)
        per_device = bytes_per_device(config, layout, DTYPES[dtype], experts)
        print(f"mesh {layout.name} ({layout.describe()}): {human_bytes(per_device)} of decoder parameters per device")


def _cmd_demo(args: argparse.Namespace) -> None:
    import numpy as np

    import kimi_jax
    from kimi_jax.chat import ChatTemplate
    from kimi_jax.demo import write_demo_checkpoint, write_demo_image
    from kimi_jax.summary import describe

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kimi-jax-demo-"))
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
    print(f"   output: {result.text.translate(_CONTROL_ESCAPES)}")
    print(f"   {len(result.token_ids)} tokens ({result.finish_reason}) in {time.perf_counter() - t0:.1f}s")
    image = write_demo_image(work / "picture.png")
    print(f"5. asking about a synthetic picture, {image} (through the vision tower)")
    question = "What is in this picture?"
    chat = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]}]
    t0 = time.perf_counter()
    [result] = kimi_jax.generate(model, [chat], tokenizer=converted, mode="instant", max_new_tokens=24, seed=args.seed)
    media = result.prompt_ids.count(model.config.media_placeholder_token_id)
    print(f"   prompt: {len(result.prompt_ids)} tokens, {media} of them the picture's vision features")
    print(f"   output: {result.text.translate(_CONTROL_ESCAPES)}")
    print(f"   {len(result.token_ids)} tokens ({result.finish_reason}) in {time.perf_counter() - t0:.1f}s")
    print(f"   next: kimi-jax generate {converted} --prompt {question!r} --image {image} --mode instant")


_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if c not in (0x09, 0x0A)}
"""Control characters (but tab and newline) shown escaped, so random output cannot drive the terminal."""


class _ReplyPrinter:
    """Streams one reply to stdout as its tokens arrive.

    With ``parse`` the output is split as a chat reply: reasoning under ``[thinking]`` (dimmed
    on a terminal), the answer under ``[answer]``, then ``[tool calls]``. Without a tokenizer
    the token ids are printed.
    """

    def __init__(self, tokenizer, *, parse: bool, thinking: bool):
        from kimi_jax.chat import StreamParser
        from kimi_jax.generation import TextDecoder

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
        text = text.translate(_CONTROL_ESCAPES)
        sys.stdout.write(f"\x1b[2m{text}\x1b[0m" if self.dim and section == "thinking" else text)
        sys.stdout.flush()


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


def _tokenizer_and_template(checkpoint: Path, *, required: bool):
    """The checkpoint's tokenizer and chat template; ``(None, None)`` if it has no tokenizer and none is required."""
    from kimi_jax.chat import ChatTemplate
    from kimi_jax.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_dir(checkpoint)
    except FileNotFoundError as e:
        if not required:
            return None, None
        raise ValueError(
            f"{e}: text prompts need the checkpoint's tokenizer (convert from a folder that has "
            "tiktoken.model and tokenizer_config.json), or pass token ids with --ids 1,2,3"
        ) from None
    return tokenizer, ChatTemplate.from_dir(checkpoint)


def _generate_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, prefill_chunk=args.prefill_chunk, cache_dtype=args.cache_dtype,
    )


def _check_images(checkpoint: Path, paths: list[str]) -> None:
    """Fails early (before the model loads) on unreadable images or a model without a vision tower."""
    from kimi_jax.config import KimiConfig
    from kimi_jax.vision.preprocess import load_image

    if paths and not KimiConfig.from_file(checkpoint).is_multimodal:
        raise ValueError(f"{checkpoint} has no vision tower (its config has no vision_config); it takes no images")
    for path in paths:
        load_image(path)


def _preprocessor(checkpoint: Path):
    """The checkpoint's media preprocessing config (K2.5's when it has no preprocessor_config.json)."""
    from kimi_jax.vision.preprocess import PreprocessConfig

    if (checkpoint / "preprocessor_config.json").is_file():
        return PreprocessConfig.from_file(checkpoint)
    return PreprocessConfig.default()


def _user_message(text: str, images: list[str]) -> dict:
    """A user turn: the images (as image parts, first) and the text."""
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": path} for path in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _cmd_generate(args: argparse.Namespace) -> None:
    import kimi_jax
    from kimi_jax.checkpoint import checkpoint_info
    from kimi_jax.generation import generation_stop_ids

    checkpoint = Path(args.checkpoint)
    checkpoint_info(checkpoint)
    tokenizer, template = _tokenizer_and_template(checkpoint, required=args.ids is None)
    images = args.image or []
    _check_images(checkpoint, images)
    preprocessor = _preprocessor(checkpoint)
    is_chat = args.ids is None and not args.raw
    media = {}
    if is_chat:
        prompt = [_user_message(args.prompt, images)]
    else:
        prompt = args.prompt if args.ids is None else args.ids
        if images:  # the raw prompt holds the placeholders; the images fill them in order
            from kimi_jax.vision.preprocess import preprocess_media

            media["pixel_values"], media["grid_thws"] = preprocess_media(images, preprocessor)
    model = kimi_jax.load(checkpoint, dtype=args.dtype, mesh=args.mesh)
    printer = _ReplyPrinter(tokenizer, parse=is_chat, thinking=args.mode == "thinking")
    [result] = kimi_jax.generate(
        model, [prompt], tokenizer=tokenizer, chat_template=template, preprocessor=preprocessor,
        seed=args.seed, stop_ids=generation_stop_ids(checkpoint), on_token=printer.token,
        **media, **_generate_kwargs(args),
    )
    printer.close()
    print(f"[{len(result.prompt_ids)} prompt tokens, {len(result.token_ids)} generated, {result.finish_reason}]",
          file=sys.stderr)


def _cmd_chat(args: argparse.Namespace) -> None:
    import kimi_jax
    from kimi_jax.checkpoint import checkpoint_info
    from kimi_jax.generation import generation_stop_ids

    checkpoint = Path(args.checkpoint)
    checkpoint_info(checkpoint)
    tokenizer, template = _tokenizer_and_template(checkpoint, required=True)
    images = args.image or []
    _check_images(checkpoint, images)
    preprocessor = _preprocessor(checkpoint)
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
                _check_images(checkpoint, [path])
            except ValueError as e:
                print(f"error: {e}")
                continue
            images.append(path)
            print(f"attached {path} to your next message")
            continue
        if not line.strip():
            continue
        history.append(_user_message(line.rstrip("\n"), images))
        images = []
        printer = _ReplyPrinter(tokenizer, parse=True, thinking=args.mode == "thinking")
        [result] = kimi_jax.generate(
            model, [history], tokenizer=tokenizer, chat_template=template, preprocessor=preprocessor,
            seed=args.seed + turn, stop_ids=generation_stop_ids(checkpoint), on_token=printer.token,
            **_generate_kwargs(args),
        )
        printer.close()
        history.append(result.parsed.to_message())
        turn += 1


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument("--mesh", help="mesh layout: a name (gpu-2, gpu-8, cpu-8, ...), a TOML file, or inline "
                                  "data=1,expert=4,tensor=2 (default: one device)")
    g.add_argument("--coordinator", help="multi-process: host:port of process 0 (or env KIMI_JAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int, help="multi-process: number of processes (KIMI_JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="multi-process: this process's index (KIMI_JAX_PROCESS_ID)")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    _add_parallel_options(p)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-jax", description="Kimi K2.5 in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to a kimi-jax (Orbax) checkpoint")
    p.add_argument("src", help="folder with config.json and *.safetensors")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--dequantize", action="store_true",
                   help="write INT4 routed experts as dense --dtype experts (default: keep them 4-bit)")
    p.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--mesh", help="first check that this mesh layout can shard the model (converted "
                                  "checkpoints themselves do not depend on the mesh)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("info", help="config summary and parameter counts of a checkpoint (converted or not)")
    p.add_argument("path", help="checkpoint folder or config.json")
    p.add_argument("--mesh", help="also show the parameter bytes per device under this mesh layout")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="write a tiny random K2.5 checkpoint, convert, load and run it")
    p.add_argument("--dir", help="working folder (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", help="run the demo model on this mesh layout (e.g. data=1,expert=1,tensor=1)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("generate", help="generate from a prompt, streaming to the terminal")
    _add_generation_options(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the user's message (sent as a one-turn chat unless --raw)")
    prompt.add_argument("--ids", type=_token_ids, help="raw prompt token ids, e.g. 1,2,3 (no tokenizer needed)")
    p.add_argument("--raw", action="store_true", help="continue --prompt as plain text, without the chat template")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="an image to ask about (repeatable); with --raw or --ids the prompt must hold one "
                        "<|media_pad|> placeholder per image")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat on stdin (/image PATH attaches an image, /exit quits)")
    _add_generation_options(p)
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--image", action="append", metavar="PATH", help="an image for the first message (repeatable)")
    p.set_defaults(func=_cmd_chat)
    return parser


def _one_voice(command: str) -> None:
    """In a multi-process run only process 0 talks to the terminal; chat needs one process."""
    import jax

    if command == "chat":
        raise ValueError("chat reads the terminal, so it runs in one process; use generate for multi-process runs")
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "coordinator"):  # commands that run the model can join a multi-process run
            from kimi_jax.distributed import initialize

            if initialize(args.coordinator, args.num_processes, args.process_id):
                _one_voice(args.command)
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"kimi-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
