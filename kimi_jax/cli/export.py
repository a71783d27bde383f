"""``kimi-jax export``: the engine's compiled steps, exported with ``jax.export`` for a platform
and mesh layout, with abstract weights at the model's real sizes (no memory needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kimi_jax.cli.common import positive_int, user_path


def _steps(text: str) -> tuple[str, ...]:
    from kimi_jax.export.steps import STEPS

    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"unknown steps {unknown or text!r}; choose from {','.join(STEPS)}")
    return steps


def run(args: argparse.Namespace) -> None:
    from kimi_jax.cli.plan import _model
    from kimi_jax.export.steps import EngineShapes, export_steps

    config, expert_format, dtype = _model(args)
    source = args.path if args.path is not None else args.config
    shapes = EngineShapes(batch=args.batch, max_length=args.max_length, prefill_chunk=args.prefill_chunk,
                          prefill_rows=args.prefill_rows)
    manifest = export_steps(
        config, platform=args.platform, mesh=args.mesh, out=args.out, shapes=shapes, steps=args.steps,
        expert_format=expert_format, dtype=dtype, moe_impl=args.moe_impl, device_kind=args.device_kind,
        source=str(source),
    )
    moe = manifest["kernels"]["moe"]
    print(f"exported for {manifest['platform']} ({manifest['device_kind']}) on {manifest['mesh']['layout']} "
          f"{manifest['mesh']['axes']}: MoE layers use {moe['kernel']} ({moe['description']})")
    for name, step in manifest["steps"].items():
        calls = ", ".join(f"{k} x{n}" for k, n in step["custom_calls"].items()) or "no custom calls"
        print(f"  {name:8s} {Path(args.out) / step['file']}  {step['bytes']:,d} bytes, {step['export_seconds']} s, {calls}")
    print(f"  manifest {Path(args.out) / 'manifest.json'}")


def register(sub) -> None:  # literal choices: building the parser imports no JAX
    p = sub.add_parser("export", help="export the engine's steps with jax.export for tpu, cuda or cpu")
    p.add_argument("path", nargs="?", type=user_path, help="checkpoint folder or config.json")
    p.add_argument("--config", metavar="NAME", help="a packaged config instead of a path (kimi-k2.5)")
    p.add_argument("--platform", required=True, choices=["tpu", "cuda", "cpu"])
    p.add_argument("--mesh", required=True, help="mesh layout: a name (tpu-v5p-64, gpu-8), a TOML file or "
                                                 "data=1,expert=8,tensor=1")
    p.add_argument("--out", required=True, type=user_path, help="folder for the steps and manifest.json")
    p.add_argument("--batch", type=positive_int, default=8, help="cache slots (default 8)")
    p.add_argument("--max-length", type=positive_int, default=4096, help="tokens per slot (default 4096)")
    p.add_argument("--prefill-chunk", type=positive_int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--prefill-rows", type=positive_int, default=4, help="requests prefilled together")
    p.add_argument("--steps", type=_steps, default=("prefill", "decode"),
                   help="comma-separated, of prefill,decode (default both)")
    p.add_argument("--moe-impl", default="grouped", choices=["grouped", "grouped-xla", "grouped-pallas",
                                                             "grouped-pallas-tpu"],
                   help="grouped (default) picks the platform's kernel")
    p.add_argument("--device-kind", help="the chip lowered for (default: from a TPU layout's name, e.g. 'TPU v5p'; "
                                         "'NVIDIA H200' for cuda)")
    p.set_defaults(func=run)
