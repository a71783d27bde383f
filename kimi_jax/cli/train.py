"""``kimi-jax train``: run a TOML train config or a packaged recipe into a folder."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from kimi_jax.train.config import load_config
    from kimi_jax.train.run import train

    if (args.config is None) == (args.recipe is None):
        raise ValueError("give a TOML config or --recipe NAME (one of them)")
    cfg = load_config(args.recipe, recipe=True) if args.recipe else load_config(args.config)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    path = train(cfg, args.out, steps=args.steps, mesh=args.mesh, progress=not args.quiet,
                 save_every=args.save_every)
    print(f"trained checkpoint: {path} (metrics: {args.out}/metrics.jsonl)")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config or a built-in recipe (e.g. --recipe calculator)")
    p.add_argument("config", nargs="?", help="TOML train config")
    p.add_argument("--recipe", help="a built-in recipe instead of a config: calculator")
    p.add_argument("--steps", type=int, help="train this many steps in all (default: the config's)")
    p.add_argument("--out", required=True, help="output folder: metrics.jsonl, state/, hf/, model/ (resumed if present)")
    p.add_argument("--mesh", help="train on this mesh layout (e.g. cpu-8 or data=2,expert=2,tensor=2)")
    p.add_argument("--save-every", type=int, help="save the train state every N steps (default: the config's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
