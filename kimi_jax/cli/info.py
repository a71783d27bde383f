"""``kimi-jax info PATH``: config summary, parameter counts and device bytes of a checkpoint."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from kimi_jax.checkpoint.convert import DTYPES, INFO_FILE
    from kimi_jax.checkpoint.destination import absolute
    from kimi_jax.checkpoint.load import checkpoint_info
    from kimi_jax.checkpoint.summary import (
        active_parameters,
        default_expert_format,
        describe,
        device_bytes,
        human_bytes,
        parameter_counts,
    )
    from kimi_jax.config.model import KimiConfig

    path = absolute(args.path)
    config = KimiConfig.from_file(path)
    print(describe(config))
    if (path / INFO_FILE).is_file():
        info = checkpoint_info(path)
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
        from kimi_jax.checkpoint.summary import bytes_per_device
        from kimi_jax.parallel.layout import load_layout

        layout = load_layout(args.mesh)
        print(f"\nmesh {layout.name} ({layout.describe()})")
        print(mesh_table(bytes_per_device(config, layout, DTYPES[dtype], experts)))


def mesh_table(per_device: dict[str, int]) -> str:
    """The parameter bytes per device by component (exact and readable), the decoder's total
    and, for a model with one, the vision tower's: what ``info --mesh`` and ``plan`` print."""
    from kimi_jax.checkpoint.summary import VISION, human_bytes

    decoder = {k: v for k, v in per_device.items() if k != VISION}
    lines = [f"{'per device':18s}{'bytes':>20s}{'':8s}"]
    lines += [f"  {name:16s}{n:>20,d}{'':8s}{human_bytes(n):>14s}" for name, n in decoder.items()]
    total = sum(decoder.values())
    lines.append(f"  {'total':16s}{total:>20,d}{'':8s}{human_bytes(total):>14s} of decoder parameters per device")
    if per_device.get(VISION):
        lines.append(f"  {VISION:16s}{per_device[VISION]:>20,d}{'':8s}{human_bytes(per_device[VISION]):>14s}"
                     " (vision tower and projector)")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("info", help="config summary and parameter counts of a checkpoint (converted or not)")
    p.add_argument("path", help="checkpoint folder or config.json")
    p.add_argument("--mesh", help="also show the parameter bytes per device under this mesh layout")
    p.set_defaults(func=run)
