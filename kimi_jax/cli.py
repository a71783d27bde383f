"""The ``kimi-jax`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _cmd_convert(args: argparse.Namespace) -> None:
    from kimi_jax.convert import convert

    t0 = time.perf_counter()
    out = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    print(f"converted {args.src} -> {out} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")


def _cmd_info(args: argparse.Namespace) -> None:
    from kimi_jax.config import KimiConfig
    from kimi_jax.summary import active_parameters, describe, parameter_counts

    config = KimiConfig.from_file(args.path)
    print(describe(config))
    counts = parameter_counts(config)
    total = sum(counts.values())
    print("\nparameters (decoder)")
    for name, n in counts.items():
        print(f"  {name:16s}{n:>20,d}  {100 * n / total:5.1f}%")
    print(f"  {'total':16s}{total:>20,d}")
    print(f"  {'active / token':16s}{int(active_parameters(config, counts)):>20,d}")


def _cmd_demo(args: argparse.Namespace) -> None:
    import numpy as np

    import kimi_jax
    from kimi_jax.summary import describe
    from kimi_jax.synthetic import TINY_TEXT, TINY_VISION, k25_config, write_checkpoint

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kimi-jax-demo-"))
    hf, converted = work / "hf", work / "converted"
    config = k25_config(TINY_TEXT, TINY_VISION)
    print(f"1. writing a random K2.5-layout checkpoint to {hf}")
    write_checkpoint(hf, config, seed=args.seed, shards=2)
    print(describe(kimi_jax.KimiConfig.from_dict(config)))
    print(f"2. converting it to {converted}")
    t0 = time.perf_counter()
    kimi_jax.convert(hf, converted, overwrite=True, progress=False)
    print(f"   done in {time.perf_counter() - t0:.1f}s")
    print("3. loading it and running a forward pass")
    model = kimi_jax.load(converted, dtype="float32")
    ids = np.random.default_rng(args.seed).integers(0, 400, size=(2, 12))
    logits = np.asarray(model(ids))
    print(f"   input_ids {ids.shape} -> logits {logits.shape}; next-token argmax {logits[:, -1].argmax(-1).tolist()}")
    model.set_moe_impl("reference")
    diff = np.abs(np.asarray(model(ids)) - logits).max()
    print(f"   grouped vs reference MoE path: max |diff| = {diff:.2e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-jax", description="Kimi K2.5 in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to a kimi-jax (Orbax) checkpoint")
    p.add_argument("src", help="folder with config.json and *.safetensors")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("info", help="config summary and parameter counts of a checkpoint (converted or not)")
    p.add_argument("path", help="checkpoint folder or config.json")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="write a tiny random K2.5 checkpoint, convert, load and run it")
    p.add_argument("--dir", help="working folder (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"kimi-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
