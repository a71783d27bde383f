"""``kimi-jax``: the parser of all commands and the entry point."""

from __future__ import annotations

import argparse
import os
import sys

from kimi_jax.cli import (
    agent,
    bench,
    chat,
    convert,
    demo,
    export,
    generate,
    info,
    plan,
    serve,
    train,
    verify,
)
from kimi_jax.cli.common import error_message

COMMANDS = (convert, info, demo, generate, chat, verify, plan, agent, train, serve, export, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-jax", description="Kimi K2.5 in JAX.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of a one-line message")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_voice(command: str) -> None:
    """In a multi-process run only process 0 talks to the terminal; chat needs one process."""
    import jax

    if command == "chat":
        raise ValueError("chat reads the terminal, so it runs in one process; use generate for multi-process runs")
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


def main(argv: list[str] | None = None) -> int:
    """Runs one command; an error is one line on stderr and exit status 2 (``--debug``: the
    traceback), an interrupt (Ctrl-C) exit status 130."""
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "coordinator"):  # commands that run the model can join a multi-process run
            from kimi_jax.parallel.distributed import initialize

            if initialize(args.coordinator, args.num_processes, args.process_id):
                _one_voice(args.command)
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\nkimi-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"kimi-jax {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
