"""``kimi-jax plan``: whether a model fits some hardware, under which mesh, with how much KV
cache room and how fast (roofline, or predicted from measured efficiencies)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kimi_jax.cli.common import positive_int, user_path


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share of device memory in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _model(args: argparse.Namespace):
    """(config, default expert format, parameter dtype) of the model asked about."""
    from kimi_jax.checkpoint.convert import INFO_FILE
    from kimi_jax.checkpoint.load import checkpoint_info
    from kimi_jax.checkpoint.summary import default_expert_format
    from kimi_jax.config.model import KimiConfig, builtin_config_dir

    if (args.path is None) == (args.config is None):
        raise ValueError("name the model once: a checkpoint folder or config.json, or --config kimi-k2.5")
    path = Path(args.path).absolute() if args.path is not None else builtin_config_dir(args.config)
    config = KimiConfig.from_file(path)
    if (path / INFO_FILE).is_file():
        info = checkpoint_info(path)
        return config, info.get("expert_format", "dense"), info["dtype"]
    return config, default_expert_format(config), "bfloat16"


def run(args: argparse.Namespace) -> None:
    from kimi_jax.plan import Request, find_hardware, plan
    from kimi_jax.plan.planner import layout_toml

    hardware = find_hardware(args.hardware)
    if args.devices < 1:
        raise ValueError(f"a plan needs at least one device, got --devices {args.devices}")
    config, expert_format, dtype = _model(args)
    experts = args.experts or ("int4" if expert_format == "int4" else "bf16")
    request = Request(hardware, args.devices, args.hosts, args.context, args.concurrency, experts, dtype,
                      args.kv_dtype, args.reserve, args.prefill_chunk)
    kwargs = {} if args.results is None else {"results": Path(args.results)}
    p = plan(config, request, args.mesh, **kwargs)
    if args.write_layout:
        Path(args.write_layout).write_text(layout_toml(p))
    if args.json:
        print(json.dumps(p.to_json(), indent=2))
    else:
        print(report(p, given=args.mesh is not None))
    if args.write_layout and not args.json:
        print(f"\nwrote the layout to {args.write_layout} (use it with --mesh {args.write_layout})")


def report(p, *, given: bool) -> str:
    """The plan as text."""
    from kimi_jax.checkpoint.summary import human_bytes
    from kimi_jax.cli.info import mesh_table

    r, j = p.request, p.to_json()
    memory = r.hardware.memory_bytes
    parts = ", ".join(f"{part} {human_bytes(n)}" for part, n in p.weights_by_part.items())
    fit = (f"yes: {human_bytes(p.weights_bytes_per_device)} of weights + {human_bytes(p.reserve_bytes)} reserve "
           f"({100 * r.reserve:g}%) of {human_bytes(memory)} per device" if p.fits else
           f"NO: {human_bytes(p.weights_bytes_per_device)} of weights + {human_bytes(p.reserve_bytes)} reserve "
           f"({100 * r.reserve:g}%) + one sequence of {p.context:,} tokens "
           f"({human_bytes(p.context * p.kv_bytes_per_token)}) exceed {human_bytes(memory)} per device")
    lines = [
        f"hardware        {r.devices} x {r.hardware.describe()}; {p.hosts} host(s)",
        f"model           {r.experts} routed experts, other parameters {r.dtype}, KV cache {r.kv_dtype}",
        f"layout          {_layout_name(p.layout)}{'' if given else ', recommended'}",
        f"fits            {fit}",
        f"weights         {parts} per device",
        "",
        mesh_table(p.weights_by_component),
        "",
        f"KV cache        {p.kv_bytes_per_token:,} bytes per token; {p.max_cached_tokens:,} cached tokens, "
        f"{p.max_concurrent_sequences:,} concurrent sequences of {p.context:,} tokens",
    ]
    if not j["concurrency_fits"]:
        lines.append(f"                (the concurrency asked for, {r.concurrency}, does not fit)")
    basis = ("roofline" if p.basis == "roofline" else
             "predicted: roofline / measured efficiency " + ", ".join(f"{e:.2f}" for e in p.decode_efficiency))
    lines += [
        f"decode          {j['decode_ms_per_token']:.2f} ms per token at batch 1; {j['decode_tokens_per_s']:,.0f} "
        f"tokens/s at {r.concurrency} concurrent sequences, each at {p.context:,} cached tokens ({basis})",
        f"prefill         {j['prefill_tokens_per_s']:,.0f} tokens/s in chunks of {r.prefill_chunk} "
        f"(roofline)",
    ]
    return "\n".join(lines)


def _layout_name(layout) -> str:
    described = layout.describe()
    return described if layout.name == described else f"{layout.name} ({described})"


def register(sub) -> None:
    p = sub.add_parser("plan", help="whether a model fits some hardware: bytes per device, KV cache room, speed")
    p.add_argument("path", nargs="?", type=user_path, help="checkpoint folder or config.json")
    p.add_argument("--config", metavar="NAME", help="a packaged config instead of a path (kimi-k2.5)")
    p.add_argument("--hardware", required=True, metavar="NAME",
                   help="h100, h200, b200, mi300x, tpu-v5e, tpu-v5p or tpu-v6e")
    p.add_argument("--devices", required=True, type=int, help="number of devices, >= 1")
    p.add_argument("--hosts", type=positive_int, help="hosts they are spread over (default: as few as hold them)")
    p.add_argument("--context", type=positive_int, help="tokens per sequence (default: the model's maximum)")
    p.add_argument("--concurrency", type=positive_int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--experts", choices=["int4", "bf16"],
                   help="routed experts' format (default: the checkpoint's, or what convert makes of it)")
    p.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reserve", type=_share, default=0.1,
                   help="share of each device's memory kept free for activations and the runtime (default 0.1)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512, help="prompt tokens per prefill step")
    p.add_argument("--mesh", help="plan for this layout (a name, a TOML file or data=1,expert=8,tensor=1) "
                                  "instead of recommending one")
    p.add_argument("--results", type=user_path, help="benchmark results folder (default: the repository's "
                                                     "benchmarks/results)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--write-layout", metavar="FILE", type=user_path, help="write the layout as a TOML file")
    p.set_defaults(func=run)
