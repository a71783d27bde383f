"""``kimi-jax convert SRC DST``: a Hugging Face checkpoint folder to a kimi-jax (Orbax) checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def run(args: argparse.Namespace) -> None:
    from kimi_jax.checkpoint.convert import convert
    from kimi_jax.checkpoint.destination import absolute

    src, dst = absolute(args.src), absolute(args.dst)
    if args.mesh:
        _check_layout_fits(src, args.mesh, args.dtype, args.dequantize)
    t0 = time.perf_counter()
    out = convert(src, dst, dtype=args.dtype, dequantize=args.dequantize, overwrite=args.overwrite,
                  progress=not args.quiet)
    print(f"converted {src} -> {out} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")


def _check_layout_fits(src: Path, mesh: str, dtype: str, dequantize: bool) -> None:
    """Fails before converting when the layout cannot shard the model the conversion will
    produce (indivisible axes; INT4 experts' scales included)."""
    from flax import nnx

    from kimi_jax.checkpoint.convert import DTYPES, SafetensorsSource, expert_format_of
    from kimi_jax.config.model import KimiConfig
    from kimi_jax.model.kimi import Kimi
    from kimi_jax.parallel import Parallel, load_layout

    config, layout = KimiConfig.from_file(src), load_layout(mesh)
    experts = expert_format_of(SafetensorsSource(src), dequantize)
    model = nnx.eval_shape(lambda: Kimi(config, dtype=DTYPES[dtype], expert_format=experts))
    Parallel(layout.abstract_mesh(), layout).state_shardings(nnx.state(model))
    print(f"mesh layout {layout.describe()} fits this model")


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to a kimi-jax (Orbax) checkpoint")
    p.add_argument("src", help="folder with config.json and *.safetensors")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--dequantize", action="store_true",
                   help="write INT4 routed experts as dense --dtype experts (default: keep them 4-bit)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace dst if it is a kimi-jax checkpoint (or an empty folder); any other folder is "
                        "refused. The new checkpoint is completed beside it, then swapped in")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--mesh", help="first check that this mesh layout can shard the model (converted "
                                  "checkpoints themselves do not depend on the mesh)")
    p.set_defaults(func=run)
