"""Agent Swarm: an orchestrator agent fans a task out to sub-agents that decode together.

The orchestrator gets the sub-agent tools of Moonshot's public agent harnesses:

- ``AgentSwarm{description, subagent_type?, prompt_template, items}``: one sub-agent per
  item, its prompt the template with ``{{item}}`` replaced; their answers come back as one
  ``<agent_swarm_result>`` (a summary, then one ``<subagent agent_id=.. item=.. outcome=..>``
  per sub-agent);
- ``CreateSubagent{name, system_prompt}`` and ``Task{description, subagent_name, prompt}``:
  a named sub-agent type, then one task for it; only its final answer comes back. Several
  ``Task`` calls in one reply run together.

Each sub-agent is its own conversation (its system prompt, its prompt, the worker tools).
All sub-agents running at once wait on the same :class:`~kimi_jax.agents.agent.Runner`, so
one batched engine step decodes all of them, and their common prefix (tool declarations and
system prompt) is prefilled once and reused from the engine's cache.

A stage is one orchestrator reply that launched sub-agents; its critical steps are the
longest sub-agent's steps. :attr:`SwarmResult.critical_steps` = orchestrator steps + the
sum over stages (the latency measure of Moonshot's report).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from kimi_jax.agents.agent import Agent, AgentResult, Gather, Runner, as_engine
from kimi_jax.agents.tools import Tool
from kimi_jax.chat.tokenizer import Tokenizer

DEFAULT_SUBAGENT_SYSTEM = (
    "You are a sub-agent working on one part of a larger task. Use the tools you need, then reply with a "
    "concise, complete answer to your part: it is all that goes back."
)
MAX_ITEMS = 128


def _no_direct_call(**_: Any) -> str:
    raise RuntimeError("sub-agent tools run inside a swarm")


SWARM_TOOLS = (
    Tool("AgentSwarm", "Run one sub-agent per item, all in parallel, each on prompt_template with {{item}} replaced by "
         "its item. This is the only tool call of its reply. Returns every sub-agent's answer.", {
             "type": "object",
             "properties": {
                 "description": {"type": "string", "description": "What the swarm does, in a few words."},
                 "subagent_type": {"type": "string", "description": "A sub-agent made with CreateSubagent (default: "
                                   "a general sub-agent)."},
                 "prompt_template": {"type": "string", "pattern": r"\{\{item\}\}",
                                     "description": "The prompt of each sub-agent; must contain {{item}}."},
                 "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": MAX_ITEMS,
                           "description": "One sub-agent per item."},
             },
             "required": ["description", "prompt_template", "items"],
         }, _no_direct_call),
    Tool("CreateSubagent", "Create a named sub-agent type with its own system prompt, for Task.", {
        "type": "object",
        "properties": {"name": {"type": "string", "description": "The sub-agent's name."},
                       "system_prompt": {"type": "string", "description": "Its system prompt."}},
        "required": ["name", "system_prompt"],
    }, _no_direct_call),
    Tool("Task", "Give a task to a sub-agent made with CreateSubagent. It works in its own context; only its final "
         "answer comes back. Several Task calls in one reply run in parallel.", {
             "type": "object",
             "properties": {"description": {"type": "string", "description": "The task, in a few words."},
                            "subagent_name": {"type": "string", "description": "The sub-agent to give it to."},
                            "prompt": {"type": "string", "description": "Everything the sub-agent needs to know."}},
             "required": ["description", "subagent_name", "prompt"],
         }, _no_direct_call),
)


@dataclasses.dataclass
class SubagentRun:
    """One sub-agent: its ``agent_id`` (launch order), ``name`` (its type), the orchestrator
    step that launched it (``stage``), its ``item`` (AgentSwarm) and ``prompt``, and its result."""

    agent_id: int
    name: str
    stage: int
    item: str | None
    prompt: str
    result: AgentResult


@dataclasses.dataclass
class SwarmResult:
    """The orchestrator's run, every sub-agent's, the critical steps, wall time and engine steps."""

    orchestrator: AgentResult
    subagents: list[SubagentRun]
    critical_steps: int
    wall_time_s: float
    engine_steps: int

    @property
    def answer(self) -> str | None:
        return self.orchestrator.answer


def critical_steps(orchestrator_steps: int, subagents: Sequence[SubagentRun]) -> int:
    """Orchestrator steps + over stages, the longest sub-agent's steps."""
    longest: dict[int, int] = {}
    for s in subagents:
        longest[s.stage] = max(longest.get(s.stage, 0), len(s.result.steps))
    return orchestrator_steps + sum(longest.values())


def outcome(result: AgentResult) -> str:
    """``"completed"`` for a sub-agent that answered, else why it stopped."""
    return "completed" if result.finish_reason == "answer" else result.finish_reason


def swarm_result_text(runs: Sequence[SubagentRun]) -> str:
    """The ``<agent_swarm_result>`` the orchestrator reads."""
    done = sum(outcome(r.result) == "completed" for r in runs)
    parts = [f"<agent_swarm_result><summary>{done} of {len(runs)} sub-agents completed</summary>"]
    for r in runs:
        parts.append(f"<subagent agent_id={quoteattr(str(r.agent_id))} item={quoteattr(r.item or '')} "
                     f"outcome={quoteattr(outcome(r.result))}>{escape(r.result.answer or '')}</subagent>")
    parts.append("</agent_swarm_result>")
    return "\n".join(parts)


class Swarm:
    """An orchestrator :class:`~kimi_jax.agents.agent.Agent` with the sub-agent tools, and its sub-agents.

    ``tools`` are the workers' tools, given to every sub-agent and to the orchestrator next to
    the sub-agent tools. ``subagent_system`` is the system prompt of AgentSwarm's default
    sub-agents; ``subagent_max_steps`` their step limit (Moonshot's harness: 100; the
    orchestrator's ``max_steps``: 15). Sub-agent ``j`` (launch order) samples with seed
    ``seed + 1000 * (j + 1)``. The engine (built from a model with ``max_slots`` slots) serves
    all of them; the other options are :class:`~kimi_jax.agents.agent.Agent`'s, for both.
    """

    def __init__(
        self, engine_or_model: Any, tools: Sequence[Any] = (), *, tokenizer: Tokenizer | str | Path,
        system: str | None = None, subagent_system: str = DEFAULT_SUBAGENT_SYSTEM, max_steps: int = 15,
        subagent_max_steps: int = 100, max_slots: int = 16, max_length: int = 8192, seed: int = 0,
        **agent_options: Any,
    ):
        engine = as_engine(engine_or_model, max_slots=max_slots, max_length=max_length)
        self.orchestrator = Agent(engine, [*SWARM_TOOLS, *tools], tokenizer=tokenizer, system=system,
                                  max_steps=max_steps, seed=seed, name="orchestrator", **agent_options)
        self._subagent_options = dict(tokenizer=self.orchestrator.tokenizer, max_steps=subagent_max_steps,
                                      **agent_options)
        self.tools, self.subagent_system, self.seed = list(tools), subagent_system, seed
        self.engine = engine

    def subagent(self, system: str | None = None, name: str = "subagent") -> Agent:
        """A sub-agent on the swarm's engine and tools (``system``: default the swarm's)."""
        return Agent(self.engine, self.tools, system=self.subagent_system if system is None else system, name=name,
                     **self._subagent_options)

    def run(self, task: str) -> SwarmResult:
        """Runs the orchestrator on ``task``; sub-agents run as it calls for them."""
        start_steps, start = self.engine.stats()["steps"], time.perf_counter()
        state = _SwarmRun(self)
        special = {"AgentSwarm": state.agent_swarm, "CreateSubagent": state.create, "Task": state.task}
        result = Runner(self.engine).run(self.orchestrator.episode(task, seed=self.seed, special=special))
        steps = self.engine.stats()["steps"] - start_steps
        result.engine_steps = steps
        return SwarmResult(result, state.runs, critical_steps(len(result.steps), state.runs),
                           time.perf_counter() - start, steps)


class _SwarmRun:
    """One swarm run's state: the sub-agent types made so far and every sub-agent launched."""

    def __init__(self, swarm: Swarm):
        self.swarm = swarm
        self.types: dict[str, str] = {}
        self.runs: list[SubagentRun] = []

    def _launch(self, name: str, system: str | None, stage: int, prompts: list[tuple[str | None, str]]) -> Generator:
        """Runs one sub-agent per ``(item, prompt)`` together; returns their :class:`SubagentRun` s."""
        first = len(self.runs)
        agent = self.swarm.subagent(system, name)
        episodes = [agent.episode(prompt, seed=self.swarm.seed + 1000 * (first + i + 1),
                                  label=f"{name} {first + i}" + (f" [{item}]" if item else ""))
                    for i, (item, prompt) in enumerate(prompts)]
        placeholders = [SubagentRun(first + i, name, stage, item, prompt, None) for i, (item, prompt) in enumerate(prompts)]
        self.runs.extend(placeholders)
        results = yield Gather(episodes)
        for run, result in zip(placeholders, results, strict=True):
            run.result = result
        return placeholders

    def agent_swarm(self, arguments: dict[str, Any], stage: int) -> Generator[Any, Any, str]:
        kind = arguments.get("subagent_type")
        if kind is not None and kind not in self.types:
            return f"Error: no sub-agent named {kind!r}; create it with CreateSubagent first"
        template = arguments["prompt_template"]
        prompts = [(item, template.replace("{{item}}", item)) for item in arguments["items"]]
        runs = yield from self._launch(kind or "subagent", self.types.get(kind), stage, prompts)
        return swarm_result_text(runs)

    def create(self, arguments: dict[str, Any], stage: int) -> str:
        self.types[arguments["name"]] = arguments["system_prompt"]
        return f"Created sub-agent {arguments['name']!r}."

    def task(self, arguments: dict[str, Any], stage: int) -> Generator[Any, Any, str]:
        name = arguments["subagent_name"]
        if name not in self.types:
            known = ", ".join(sorted(self.types)) or "none yet"
            return f"Error: no sub-agent named {name!r} (created: {known}); create it with CreateSubagent first"
        [run] = yield from self._launch(name, self.types[name], stage, [(None, arguments["prompt"])])
        if outcome(run.result) != "completed":
            return f"Error: the sub-agent stopped without an answer ({run.result.finish_reason})"
        return run.result.answer
