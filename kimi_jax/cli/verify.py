"""``kimi-jax verify CKPT``: read every array of a converted checkpoint and check it against
the checksums recorded at conversion."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from kimi_jax.checkpoint.integrity import ChecksumError, verify

    try:
        report = verify(args.checkpoint, progress=not args.quiet)
    except ChecksumError as e:
        print(e.report)
        bad = e.report.bad
        raise ValueError(f"{len(bad)} of {e.report.checked} arrays are bad: {bad[0].name}"
                         + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")) from None
    print(f"OK: {report}")


def register(sub) -> None:
    p = sub.add_parser("verify", help="check every array of a converted checkpoint against its recorded checksums")
    p.add_argument("checkpoint", help="converted checkpoint folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
