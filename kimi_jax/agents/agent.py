"""Agent mode: K2.5 calls tools in a loop until it answers.

:class:`Agent` renders the conversation with the checkpoint's chat template (tools declared
TypeScript-style), generates a reply on a serving :class:`~kimi_jax.inference.engine.Engine`,
parses it into reasoning, answer and tool calls (:mod:`kimi_jax.chat.parser`), runs the
calls and appends their results as ``tool`` messages, keyed by the model's own call ids.
Reasoning stays in the assistant messages, so the template keeps it within the tool-use
turn. The loop ends at an answer without tool calls, at ``max_steps`` replies, or when the
context is full.

Runs are generators driven by :class:`Runner`: a run yields what it waits for (a generation,
a tool call, a group of other runs), so many runs (the sub-agents of
:mod:`kimi_jax.agents.swarm`) share one engine and decode in the same batched steps, while
tool calls run on a thread pool meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kimi_jax.agents.tools import as_tool, result_text
from kimi_jax.chat.parser import StreamParser, ToolCall, parse_output
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.inference.generate import MODES, TextDecoder, generation_stop_ids
from kimi_jax.inference.sampling import RECOMMENDED_SAMPLING

CONTEXT_POLICIES = ("keep_all", "latest_round", "discard_all")
"""What of the earlier tool rounds the model sees (Moonshot's harnesses): everything; only
the latest round's tool results; or, once the context passes ``context_limit`` tokens,
nothing of the rounds so far (the model goes on from the task and what follows)."""


@dataclasses.dataclass
class ToolCallRecord:
    """One executed call: the model's ``id``, ``name`` and arguments, the ``result`` text the
    model got back, and ``error`` (``None`` when the tool returned normally)."""

    id: str
    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str
    result: str
    error: str | None
    seconds: float


@dataclasses.dataclass
class Step:
    """One reply of the model and the calls it made. ``prompt_tokens`` were given,
    ``cached_tokens`` of them found in the engine's cache; ``finish_reason`` is the
    generation's (``"stop"`` or ``"length"``)."""

    index: int
    reasoning: str
    content: str
    tool_calls: list[ToolCallRecord]
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    finish_reason: str


@dataclasses.dataclass
class AgentResult:
    """A finished run: every message (system, task, replies, tool results), the final
    ``answer`` (``None`` unless the model answered without calling tools), the steps, and why it
    ended: ``"answer"``, ``"length"`` (the last reply ran out of tokens), ``"max_steps"`` or
    ``"context"`` (the next prompt did not fit the engine's ``max_length``). ``engine_steps``
    (top-level runs only) counts the engine steps the run took."""

    messages: list[dict[str, Any]]
    answer: str | None
    steps: list[Step]
    finish_reason: str
    wall_time_s: float
    engine_steps: int | None = None

    @property
    def tool_calls(self) -> list[ToolCallRecord]:
        """Every call made, in order."""
        return [call for step in self.steps for call in step.tool_calls]


@dataclasses.dataclass
class AgentEvent:
    """Something a run did, for streaming: ``kind`` is ``"reasoning"`` / ``"content"`` (``text``
    holds new text of the reply being generated), ``"tool_call"`` (before the call runs),
    ``"tool_result"`` (``call`` holds the record) or ``"done"``; ``agent`` names the run."""

    agent: str
    step: int
    kind: str
    text: str = ""
    call: ToolCallRecord | None = None


# ---- what a run waits for


@dataclasses.dataclass
class Generate:
    """A run waits for the engine to generate from ``prompt_ids`` (resumed with the request)."""

    prompt_ids: list[int]
    options: dict[str, Any]


@dataclasses.dataclass
class Job:
    """A run waits for ``function()`` on the thread pool (resumed with ``(value, exception)``)."""

    function: Callable[[], Any]


@dataclasses.dataclass
class Gather:
    """A run waits for other runs (resumed with their return values, in order)."""

    runs: list[Generator[Any, Any, Any]]


RunGenerator = Generator[Generate | Job | Gather, Any, Any]


def _guarded(function: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return function(), None
    except Exception as e:  # a tool's failure is the model's to read
        return None, e


@dataclasses.dataclass(eq=False)
class _Task:
    run: RunGenerator
    waiting: Any = None  # an engine request, a Future or a list of _Task
    generating: bool = False  # waiting is an engine request
    done: bool = False
    result: Any = None


class Runner:
    """Drives runs to completion: steps ``engine`` while any run waits for a generation, so
    all runs waiting at once decode in the same batched steps; tool jobs run on a pool of
    ``workers`` threads meanwhile.

    Launches ramp up so that runs share their cached prefix: of prompts whose first
    ``share_min`` tokens are the same, the first is submitted alone; the others wait until it
    has been read (its first token produced), then the engine copies the shared part of its
    slot's cache instead of prefilling it again.
    """

    def __init__(self, engine: Any, *, workers: int = 16, share_min: int = 64):
        self.engine, self.workers, self.share_min = engine, workers, share_min
        self._held: list[tuple[_Task, Generate]] = []
        self._heads: set[tuple[int, ...]] = set()  # the first share_min tokens of every prompt submitted

    def run(self, root: RunGenerator) -> Any:
        """Runs ``root`` (and every run it gathers) to completion; returns its return value."""
        live: list[_Task] = []
        self._held, self._heads = [], set()
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="kimi-jax-tool") as pool:
            top = _Task(root)
            try:
                self._resume(top, None, live, pool)
                while not top.done:
                    progressed = False
                    for task in list(live):
                        value = self._ready(task)
                        if value is not _NOT_READY:
                            self._resume(task, value, live, pool)
                            progressed = True
                    self._submit(live)
                    if any(t.generating and t.waiting is not None and not t.waiting.done for t in live):
                        self.engine.step()
                    elif not progressed:
                        jobs = [t.waiting for t in live if isinstance(t.waiting, concurrent.futures.Future)]
                        concurrent.futures.wait(jobs, return_when=concurrent.futures.FIRST_COMPLETED)
            except BaseException:
                for task in live:
                    if task.generating and task.waiting is not None and not task.waiting.done:
                        self.engine.cancel(task.waiting)
                raise
        return top.result

    def _submit(self, live: list[_Task]) -> None:
        """Submits the held generations but those whose prefix a request still reads (the
        first of a new prefix is submitted, and reads it)."""
        m = self.share_min
        reading = {tuple(t.waiting.prompt_ids[:m]) for t in live
                   if t.generating and t.waiting is not None and not t.waiting.done and not t.waiting.token_ids}
        held, self._held = self._held, []
        for task, need in held:
            head = tuple(need.prompt_ids[:m]) if len(need.prompt_ids) >= m else None
            if head is not None and head in reading:
                self._held.append((task, need))
                continue
            task.waiting = self.engine.submit(need.prompt_ids, **need.options)
            if head is not None and head not in self._heads:
                self._heads.add(head)
                reading.add(head)

    @staticmethod
    def _ready(task: _Task) -> Any:
        w = task.waiting
        if isinstance(w, concurrent.futures.Future):
            return w.result() if w.done() else _NOT_READY
        if isinstance(w, list):
            return [c.result for c in w] if all(c.done for c in w) else _NOT_READY
        return w if w is not None and w.done else _NOT_READY

    def _resume(self, task: _Task, value: Any, live: list[_Task], pool: concurrent.futures.Executor) -> None:
        """Sends ``value`` into ``task``'s run and starts what it waits for next."""
        try:
            need = task.run.send(value)
        except StopIteration as stop:
            task.done, task.result, task.waiting, task.generating = True, stop.value, None, False
            if task in live:
                live.remove(task)
            return
        if task not in live:
            live.append(task)
        task.generating = isinstance(need, Generate)
        if isinstance(need, Generate):
            task.waiting = None  # submitted by _submit
            self._held.append((task, need))
        elif isinstance(need, Job):
            task.waiting = pool.submit(_guarded, need.function)
        elif isinstance(need, Gather):
            children = [_Task(run) for run in need.runs]
            task.waiting = children
            for child in children:
                self._resume(child, None, live, pool)
            if all(c.done for c in children):
                self._resume(task, [c.result for c in children], live, pool)
        else:
            raise TypeError(f"a run yielded {type(need).__name__}; runs yield Generate, Job or Gather")


_NOT_READY = object()


def _gather(runs: list[RunGenerator]) -> RunGenerator:
    return (yield Gather(runs))


def as_engine(engine_or_model: Any, *, max_slots: int, max_length: int, prefill_chunk: int = 256) -> Any:
    """``engine_or_model`` if it serves requests (``submit`` / ``step``), else a new
    :class:`~kimi_jax.inference.engine.Engine` for the model (``max_length`` capped at its context)."""
    if hasattr(engine_or_model, "submit") and hasattr(engine_or_model, "step"):
        return engine_or_model
    from kimi_jax.inference.engine import Engine
    from kimi_jax.model.kimi import Kimi

    if not isinstance(engine_or_model, Kimi):
        raise TypeError(f"expected an Engine or a Kimi model, got {type(engine_or_model).__name__}")
    context = engine_or_model.config.text.max_position_embeddings
    return Engine(engine_or_model, max_slots=max_slots, max_length=min(max_length, context),
                  prefill_chunk=prefill_chunk)


def load_tokenizer(tokenizer: Tokenizer | str | Path) -> tuple[Tokenizer, list[int]]:
    """The tokenizer (loaded from a checkpoint folder if a path) and its stop ids (plus the
    folder's ``generation_config.json`` ones)."""
    if isinstance(tokenizer, str | Path):
        folder = Path(tokenizer).expanduser()
        extra = generation_stop_ids(folder)
        tokenizer = Tokenizer.from_dir(folder)
    elif isinstance(tokenizer, Tokenizer):
        extra = []
    else:
        raise TypeError(f"tokenizer must be a Tokenizer or a checkpoint folder, got {type(tokenizer).__name__}")
    return tokenizer, sorted(set(tokenizer.stop_ids) | set(extra))


class _StepStream:
    """Turns one reply's tokens into ``reasoning`` / ``content`` events as they arrive."""

    def __init__(self, tokenizer: Tokenizer, thinking: bool, emit: Callable[[str, str], None]):
        self._decoder, self._parser, self._emit = TextDecoder(tokenizer), StreamParser(thinking=thinking), emit

    def token(self, token_id: int) -> None:
        delta = self._parser.feed(self._decoder.push(token_id))
        for kind in ("reasoning", "content"):
            if getattr(delta, kind):
                self._emit(kind, getattr(delta, kind))


Special = Callable[[dict[str, Any], int], Generator[Any, Any, str] | str]
"""A tool that acts on the run itself (the swarm's sub-agent tools): given the arguments and
the step, it returns the result text, or a run (a generator) that returns it."""


class Agent:
    """A tool-calling agent on a serving engine.

    ``engine_or_model``: an :class:`~kimi_jax.inference.engine.Engine` (its slots may be
    shared with other agents, and what they cache is reused) or a model, for which an engine
    of ``max_slots`` slots of ``max_length`` tokens is built. ``tools``: callables (schemas
    from type hints and docstrings), :class:`~kimi_jax.agents.tools.Tool` s, or
    ``(declaration, function)`` pairs. ``tokenizer``: a Tokenizer or the checkpoint folder.
    ``system``: the system prompt, if any. ``mode``: ``"thinking"`` or ``"instant"`` (prompt
    and Moonshot's sampling defaults; ``temperature`` / ``top_p`` override them, 0 is greedy;
    ``top_k`` 0 is off).
    ``max_steps``: replies per run. ``context``: one of :data:`CONTEXT_POLICIES`
    (``context_limit`` tokens: apply the policy only once the prompt would be longer;
    ``discard_all`` needs it). ``on_event`` receives :class:`AgentEvent` s as the run goes.
    ``stop_ids`` replace the tokenizer's (``<|im_end|>``, ``[EOS]``) and the checkpoint's
    ``generation_config.json`` ones that end a reply (``()``: replies run to ``max_new_tokens``).
    """

    def __init__(
        self, engine_or_model: Any, tools: Sequence[Any] = (), *, tokenizer: Tokenizer | str | Path,
        system: str | None = None, mode: str = "thinking", max_steps: int = 15, max_new_tokens: int = 1024,
        temperature: float | None = None, top_p: float | None = None, top_k: int = 0, seed: int = 0,
        context: str = "keep_all",
        context_limit: int | None = None, on_event: Callable[[AgentEvent], None] | None = None,
        max_slots: int = 1, max_length: int = 8192, name: str = "agent", stop_ids: Sequence[int] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        if context not in CONTEXT_POLICIES:
            raise ValueError(f"unknown context policy {context!r}; choose from {CONTEXT_POLICIES}")
        if context == "discard_all" and context_limit is None:
            raise ValueError("the discard_all context policy needs context_limit (tokens)")
        for key, value in (("max_steps", max_steps), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        self.engine = as_engine(engine_or_model, max_slots=max_slots, max_length=max_length)
        self.tokenizer, self.stop_ids = load_tokenizer(tokenizer)
        if stop_ids is not None:
            self.stop_ids = sorted(set(stop_ids))
        self.tools = [as_tool(*t) if isinstance(t, tuple) else as_tool(t) for t in tools]
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"two tools share a name: {sorted(n for n in names if names.count(n) > 1)}")
        self.system, self.mode, self.max_steps, self.max_new_tokens = system, mode, max_steps, max_new_tokens
        defaults = RECOMMENDED_SAMPLING[mode]
        self.temperature = defaults.temperature if temperature is None else temperature
        self.top_p = defaults.top_p if top_p is None else top_p
        self.top_k, self.seed, self.context, self.context_limit = top_k, seed, context, context_limit
        self.on_event, self.name = on_event, name

    @property
    def declarations(self) -> list[dict[str, Any]]:
        """The tools as declared to the model (OpenAI-style)."""
        return [t.schema for t in self.tools]

    def run(self, task: str, *, seed: int | None = None) -> AgentResult:
        """Runs the agent on ``task`` (the user's message) until it answers or a limit ends it."""
        start = self.engine.stats()["steps"]
        result = Runner(self.engine).run(self.episode(task, seed=self.seed if seed is None else seed))
        result.engine_steps = self.engine.stats()["steps"] - start
        return result

    def run_many(self, tasks: Sequence[str], *, seeds: Sequence[int] | None = None) -> list[AgentResult]:
        """Runs the agent on every task at once (each its own conversation), all decoding in the
        same engine steps; task ``i`` samples with ``seeds[i]`` (default ``seed + i``). Each
        result's ``engine_steps`` is the engine steps all of them took together."""
        seeds = [self.seed + i for i in range(len(tasks))] if seeds is None else list(seeds)
        if len(seeds) != len(tasks):
            raise ValueError(f"{len(tasks)} tasks but {len(seeds)} seeds")
        episodes = [self.episode(t, seed=s, label=f"{self.name} {i}") for i, (t, s) in enumerate(zip(tasks, seeds))]
        start = self.engine.stats()["steps"]
        results = Runner(self.engine).run(_gather(episodes))
        for result in results:
            result.engine_steps = self.engine.stats()["steps"] - start
        return results

    # ---- one run, as a generator

    def episode(self, task: str, *, seed: int, label: str | None = None,
                special: Mapping[str, Special] | None = None) -> RunGenerator:
        """The run on ``task`` as a generator for :class:`Runner` (returns the :class:`AgentResult`).
        ``special`` tools are runs themselves (their declarations must be among the tools)."""
        if not isinstance(task, str) or not task.strip():
            raise ValueError("the task must be a non-empty string")
        label = label or self.name
        start = time.perf_counter()
        messages: list[dict[str, Any]] = ([{"role": "system", "content": self.system}] if self.system else [])
        messages.append({"role": "user", "content": task})
        head, dropped = len(messages), len(messages)  # discard_all: rounds before `dropped` are gone
        thinking = self.mode == "thinking"
        steps: list[Step] = []
        answer, finish = None, "max_steps"
        for k in range(self.max_steps):
            ids = self._encode(self._view(messages, head, dropped))
            if self.context == "discard_all" and len(ids) > self.context_limit and dropped < len(messages):
                dropped = len(messages)
                ids = self._encode(self._view(messages, head, dropped))
            if len(ids) >= self.engine.max_length:
                finish = "context"
                break
            on_token = None
            if self.on_event is not None:
                on_token = _StepStream(self.tokenizer, thinking, lambda kind, text, k=k: self.on_event(
                    AgentEvent(label, k, kind, text))).token
            request = yield Generate(ids, dict(
                max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                seed=seed + k,
                stop_ids=self.stop_ids, on_token=on_token))
            out = list(request.token_ids)
            stopped = bool(out) and out[-1] in self.stop_ids
            parsed = parse_output(self.tokenizer.decode(out[:-1] if stopped else out), thinking=thinking,
                                  tools=self.declarations)
            messages.append(parsed.to_message())
            records = []
            if parsed.tool_calls:
                outcomes = yield Gather([self._call(call, label, k, special or {}) for call in parsed.tool_calls])
                for call, (text, error, seconds) in zip(parsed.tool_calls, outcomes, strict=True):
                    record = ToolCallRecord(call.id, call.name, call.arguments, call.raw_arguments, text, error, seconds)
                    records.append(record)
                    messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text})
                    self._emit(label, k, "tool_result", call=record)
            steps.append(Step(k, parsed.reasoning, parsed.content, records, len(ids), len(out),
                              getattr(request, "cached_prefix", 0), "stop" if stopped else "length"))
            if not parsed.tool_calls:
                answer, finish = parsed.content, "answer" if stopped else "length"
                break
        self._emit(label, len(steps), "done", answer or "")
        return AgentResult(messages, answer, steps, finish, time.perf_counter() - start)

    def _encode(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.tokenizer.encode_chat(messages, tools=self.declarations or None, thinking=self.mode == "thinking")

    def _view(self, messages: list[dict[str, Any]], head: int, dropped: int) -> list[dict[str, Any]]:
        """The messages the model sees under the context policy."""
        if self.context == "discard_all":
            return messages[:head] + messages[dropped:]
        if self.context == "latest_round" and (self.context_limit is None or len(self._encode(messages)) > self.context_limit):
            last_call = max((i for i, m in enumerate(messages) if m.get("tool_calls")), default=len(messages))
            return [m for i, m in enumerate(messages) if m["role"] != "tool" or i > last_call]
        return messages

    def _emit(self, label: str, step: int, kind: str, text: str = "", call: ToolCallRecord | None = None) -> None:
        if self.on_event is not None:
            self.on_event(AgentEvent(label, step, kind, text, call))

    def _call(self, call: ToolCall, label: str, step: int, special: Mapping[str, Special]) -> Generator:
        """One call, as a run: returns ``(result text, error or None, seconds)``."""
        self._emit(label, step, "tool_call", call.raw_arguments,
                   ToolCallRecord(call.id, call.name, call.arguments, call.raw_arguments, "", None, 0.0))
        start = time.perf_counter()
        tool = next((t for t in self.tools if t.name == call.name), None)
        if call.error:
            error = f"the call could not be read: {call.error}"
        elif tool is None:
            error = f"there is no tool {call.name!r}; the tools are {', '.join(t.name for t in self.tools) or 'none'}"
        else:
            error = tool.validate(call.arguments)
            if error:
                error = f"invalid arguments for {tool.name}: {error}"
        if error:
            return f"Error: {error}", error, 0.0
        if tool.name in special:
            text = special[tool.name](call.arguments, step)
            if inspect.isgenerator(text):
                text = yield from text
            return text, None, time.perf_counter() - start
        value, exception = yield Job(lambda: tool.function(**call.arguments))
        if exception is not None:
            error = f"{type(exception).__name__}: {exception}"
            return f"Error: {error}", error, time.perf_counter() - start
        return result_text(value), None, time.perf_counter() - start
