"""``kimi-jax agent CKPT --task ...``: an agent (or a swarm) with tools, each step streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kimi_jax.cli.common import (
    CONTROL_ESCAPES,
    add_generation_options,
    positive_int,
    user_path,
)

RESULT_PREVIEW = 400
"""Characters of a tool result shown on the terminal (the model gets all of it)."""


def tool_spec(text: str) -> tuple[str, str | None]:
    """``calculator``, ``python`` or ``files=DIR`` (the folder must exist)."""
    name, _, value = text.partition("=")
    if name in ("calculator", "python") and not value:
        return name, None
    if name == "files" and value:
        folder = user_path(value)
        if not Path(folder).is_dir():
            raise argparse.ArgumentTypeError(f"files={value}: not a folder")
        return name, folder
    raise argparse.ArgumentTypeError(f"expected calculator, python or files=DIR, got {text!r}")


def build_tools(specs: list[tuple[str, str | None]]) -> list:
    from kimi_jax.agents import calculator, file_tools, python_tool

    tools = []
    for name, value in specs:
        tools.extend({"calculator": lambda: [calculator], "python": lambda: [python_tool()],
                      "files": lambda: file_tools(value)}[name]())
    return tools


class EventPrinter:
    """Prints agent events: the main agent's reasoning and answer as they stream, every
    agent's tool calls, results (cut to :data:`RESULT_PREVIEW` characters) and end."""

    def __init__(self, main: str):
        self.main, self.at = main, None
        self.dim = sys.stdout.isatty()

    def __call__(self, event) -> None:
        if event.kind in ("reasoning", "content"):
            if event.agent != self.main:
                return
            where = (event.agent, event.step, event.kind)
            if where != self.at:
                self._line(f"[{event.agent} step {event.step}: {'thinking' if event.kind == 'reasoning' else 'answer'}]")
                self.at = where
            text = event.text.translate(CONTROL_ESCAPES)
            sys.stdout.write(f"\x1b[2m{text}\x1b[0m" if self.dim and event.kind == "reasoning" else text)
        elif event.kind == "tool_call":
            self._line(f"[{event.agent} step {event.step}: call {event.call.name}] {event.call.raw_arguments}")
        elif event.kind == "tool_result":
            result = event.call.result
            cut = result[:RESULT_PREVIEW] + (f" [... {len(result) - RESULT_PREVIEW} more]" if len(result) > RESULT_PREVIEW
                                             else "")
            self._line(f"[{event.agent} step {event.step}: result of {event.call.id}] {cut}".translate(CONTROL_ESCAPES))
        elif event.kind == "done" and event.agent != self.main:
            self._line(f"[{event.agent} done after {event.step} steps] {event.text}".translate(CONTROL_ESCAPES))
        sys.stdout.flush()

    def _line(self, text: str) -> None:
        sys.stdout.write(("\n" if self.at is not None else "") + text + "\n")
        self.at = ("line",)


def run(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    import kimi_jax
    from kimi_jax.agents import Agent, Swarm
    from kimi_jax.checkpoint.load import checkpoint_info
    from kimi_jax.cli.common import checkpoint_tokenizer

    checkpoint = Path(args.checkpoint)
    checkpoint_info(checkpoint)
    checkpoint_tokenizer(checkpoint, required=True)
    tools = build_tools(args.tool or [])
    model = kimi_jax.load(checkpoint, dtype=args.dtype, mesh=args.mesh)
    engine = kimi_jax.Engine(model, max_slots=args.max_slots, max_length=min(
        args.max_length, model.config.text.max_position_embeddings), prefill_chunk=args.prefill_chunk,
        cache_dtype=jnp.dtype(args.cache_dtype))
    printer = EventPrinter("orchestrator" if args.swarm else "agent")
    options = dict(tokenizer=checkpoint, system=args.system, mode=args.mode, max_steps=args.max_steps,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, context=args.context, context_limit=args.context_limit,
                   on_event=printer)
    if args.swarm:
        result = Swarm(engine, tools, subagent_max_steps=args.subagent_max_steps, **options).run(args.task)
        main, extra = result.orchestrator, (f", {len(result.subagents)} sub-agents, {result.critical_steps} "
                                            "critical steps")
    else:
        main, extra = Agent(engine, tools, **options).run(args.task), ""
    print(flush=True)
    print(f"[{main.finish_reason}: {len(main.steps)} steps, {len(main.tool_calls)} tool calls{extra}, "
          f"{main.engine_steps} engine steps, {main.wall_time_s:.1f} s]", file=sys.stderr)


def register(sub) -> None:
    from kimi_jax.agents.agent import CONTEXT_POLICIES

    p = sub.add_parser("agent", help="run an agent (or an agent swarm) with tools on a task, streaming each step")
    add_generation_options(p)
    p.set_defaults(max_new_tokens=1024)
    p.add_argument("--task", required=True, help="the task (the user's message)")
    p.add_argument("--tool", action="append", type=tool_spec, metavar="TOOL",
                   help="calculator, python (sandboxed subprocess, no network) or files=DIR (read and list files "
                        "inside DIR); repeatable")
    p.add_argument("--system", help="the system prompt")
    p.add_argument("--swarm", action="store_true",
                   help="an orchestrator that can fan out to sub-agents (AgentSwarm, CreateSubagent, Task)")
    p.add_argument("--max-steps", type=positive_int, default=15, help="replies of the agent (orchestrator), >= 1")
    p.add_argument("--subagent-max-steps", type=positive_int, default=100, help="replies of each sub-agent, >= 1")
    p.add_argument("--context", choices=CONTEXT_POLICIES, default="keep_all",
                   help="what of earlier tool rounds the model sees (discard_all needs --context-limit)")
    p.add_argument("--context-limit", type=positive_int, help="apply the context policy past this many tokens")
    p.add_argument("--max-slots", type=positive_int, default=16, help="sequences decoded together, >= 1")
    p.add_argument("--max-length", type=positive_int, default=8192, help="tokens per sequence (capped at the context)")
    p.set_defaults(func=run)
