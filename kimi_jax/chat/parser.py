"""Model output back to messages: :func:`parse_output` and :class:`StreamParser` split
generated text into reasoning, answer and tool calls, without raising on truncated or
malformed output.

Given the declared ``tools``, a call the model wrote with a foreign id (a bare counter
``0``, ``call_...``, a tool name without ``functions.`` and index, or ``call_8f2a:0``: no
``functions.`` prefix and no declared tool's name) gets its function from them
(:func:`kimi_jax.chat.tool_ids.recover_tool_name`): it is marked :attr:`ToolCall.recovered`,
has no error for its id, and a warning in :attr:`ParsedOutput.warnings` says how its name
was found. A tool-call section that holds no
call is reported there too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kimi_jax.chat.special import (
    EOS,
    IM_END,
    THINK,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.chat.tool_ids import declared_tools, recover_tool_name


@dataclasses.dataclass
class ToolCall:
    """One tool call written by the model.

    ``name`` is read from ``id`` (``functions.NAME:INDEX``; ``NAME:INDEX`` is read too).
    When the parser knows the declared tools and the id is not of that form (``0``,
    ``call_8f2a``, ``toolu_01...``), or lacks the ``functions.`` prefix and names no declared
    tool (``call_8f2a:0``), the name is recovered from the tools if they settle it
    (:func:`kimi_jax.chat.tool_ids.recover_tool_name`): ``recovered`` is true, ``id`` stays
    as the model wrote it (rendering the call back writes ``functions.NAME:INDEX``), the id
    is no error, and :attr:`ParsedOutput.warnings` says how the name was found. The
    arguments are not checked against the tool's schema. When the tools do not settle it,
    the call is read as without them (an id not of the form is an error, naming why the
    tools did not help). ``arguments`` is the parsed JSON
    object of ``raw_arguments``, or ``None`` when that text is not a standard JSON object:
    invalid JSON, nested deeper than :data:`MAX_ARGUMENT_DEPTH` levels, or holding ``NaN`` /
    ``Infinity`` / ``-Infinity`` or a number too large for a float (``1e999``). ``error`` says
    what was wrong (cut off, missing markers, bad or non-standard JSON, too deep, odd id), or
    is ``None``. ``raw_arguments`` is always the text as the model wrote it.
    """

    id: str
    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str
    error: str | None = None
    recovered: bool = False


@dataclasses.dataclass
class ParsedOutput:
    """Model output split into reasoning, answer text and tool calls.

    :meth:`StreamParser.feed` returns one of these holding only what a chunk added.
    ``warnings`` are problems that no :attr:`ToolCall.error` carries: a tool-call section
    that held no call (what it held instead is quoted), and how the name of each recovered
    call was found.
    """

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation (arguments kept as written:
        ``raw_arguments``, never re-serialized)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.raw_arguments}}
                for c in self.tool_calls
            ]
        return message


_MARKERS = (THINK, THINK_END, TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END, TOOL_CALL_BEGIN,
            TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END, IM_END, EOS)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in _MARKERS))
_MARKER_PREFIXES = frozenset(m[:k] for m in _MARKERS for k in range(1, len(m)))
_MAX_PREFIX_LEN = max(len(p) for p in _MARKER_PREFIXES)
_TOOL_ID_RE = re.compile(r"(?:functions\.)?(.+):(\d+)", re.DOTALL)
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
                    bool: "boolean", type(None): "null"}

# Parser states
_REASONING, _CONTENT, _SECTION, _CALL_ID, _CALL_ARGS, _DONE = range(6)


MAX_ARGUMENT_DEPTH = 100
"""Tool-call arguments nested deeper than this many lists / objects are reported, not parsed."""

_QUOTE = 200
"""How much of the text of a tool-call section without calls its warning quotes."""

_JSON_STRUCTURE_RE = re.compile(r'[\[\]{}"\\]')


def _json_depth(raw: str) -> int:
    """Deepest ``[`` / ``{`` nesting of JSON-like text, outside strings (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    escape_at = -2
    for match in _JSON_STRUCTURE_RE.finditer(raw):
        ch = match.group()
        if in_string:
            if escaped:
                escaped = False
                if match.start() == escape_at + 1:
                    continue
            if ch == "\\":
                escaped, escape_at = True, match.start()
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string, escaped = True, False
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return deepest


class _NonStandardNumber(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonStandardNumber(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NonStandardNumber(f"{text} (too large for a float)")
    return value


def _parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    if not raw.strip():
        return None, "empty arguments"
    if _json_depth(raw) > MAX_ARGUMENT_DEPTH:
        return None, f"arguments nest deeper than {MAX_ARGUMENT_DEPTH} levels"
    try:
        value = json.loads(raw, strict=False, parse_constant=_reject_constant, parse_float=_finite_float)
    except _NonStandardNumber as e:
        return None, f"arguments are not standard JSON: {e}"
    except json.JSONDecodeError as e:
        return None, f"arguments are not valid JSON ({e})"
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return None, f"arguments are not standard JSON: {e}"
    except RecursionError:
        return None, "arguments nest too deep"
    if not isinstance(value, dict):
        return None, f"arguments are a JSON {_JSON_TYPE_NAMES[type(value)]}, not an object"
    return value, None


class StreamParser:
    """Incremental :func:`parse_output`: feed decoded text in chunks of any size.

    Markers split across chunks are held back until they are complete. A tool call is
    reported once its ``<|tool_call_end|>`` (or whatever ends it) has arrived. Text between
    the calls of a section, and everything after ``<|im_end|>`` or ``[EOS]``, is ignored. A
    section that ends without a call is a warning once it ends. ``tools`` (OpenAI-style, as
    declared to the model) name the calls written with foreign ids (see :class:`ToolCall`).
    """

    def __init__(self, *, thinking: bool = True, tools: Sequence[Mapping[str, Any]] | None = None):
        self._tools = declared_tools(tools)
        self._names = {t.name for t in self._tools}
        self._warnings: list[str] = []
        self._section_start: int | None = None  # calls before the open section, None outside one
        self._section_text = ""  # the first _QUOTE + 1 characters of the open section's text, less leading spaces
        self._state = _REASONING if thinking else _CONTENT
        self._pending = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._call_id: list[str] = []
        self._call_args: list[str] | None = None  # None until <|tool_call_argument_begin|>
        self._delta = ParsedOutput()
        self._closed = False

    @property
    def result(self) -> ParsedOutput:
        """Everything parsed so far."""
        return ParsedOutput("".join(self._reasoning), "".join(self._content), list(self._tool_calls),
                            list(self._warnings))

    def feed(self, chunk: str) -> ParsedOutput:
        """Parse one more chunk of output; returns what it added."""
        if self._closed:
            raise RuntimeError("StreamParser.feed after close()")
        self._delta = ParsedOutput()
        text = self._pending + chunk
        pos = 0
        for match in _MARKER_RE.finditer(text):
            self._text(text[pos:match.start()])
            self._marker(match.group())
            pos = match.end()
        rest = text[pos:]
        held = next((k for k in range(min(len(rest), _MAX_PREFIX_LEN), 0, -1) if rest[-k:] in _MARKER_PREFIXES), 0)
        self._text(rest[:len(rest) - held])
        self._pending = rest[len(rest) - held:]
        return self._delta

    def close(self) -> ParsedOutput:
        """End of output: flush held-back text and report an unfinished tool call as cut off."""
        if self._closed:
            return ParsedOutput()
        self._delta = ParsedOutput()
        self._text(self._pending)
        self._pending = ""
        if self._state in (_CALL_ID, _CALL_ARGS):
            self._end_call(closed=False)
        self._end_section("the output ended")
        self._state = _DONE
        self._closed = True
        return self._delta

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._state == _REASONING:
            self._reasoning.append(text)
            self._delta.reasoning += text
        elif self._state == _CONTENT:
            self._content.append(text)
            self._delta.content += text
        elif self._state == _CALL_ID:
            self._call_id.append(text)
        elif self._state == _CALL_ARGS:
            self._call_args.append(text)
        elif self._state == _SECTION:  # text outside the calls: kept (the start of it) for a warning
            if not self._section_text:
                text = text.lstrip()
            self._section_text += text[:_QUOTE + 1 - len(self._section_text)]

    def _marker(self, marker: str) -> None:
        state = self._state
        if state == _DONE:
            return
        if marker in (IM_END, EOS):
            if state in (_CALL_ID, _CALL_ARGS):
                self._end_call(closed=False)
            self._end_section(f"{marker} came")
            self._state = _DONE
        elif state in (_REASONING, _CONTENT):
            if marker == THINK:
                self._state = _REASONING
            elif marker == THINK_END:
                self._state = _CONTENT
            elif marker == TOOL_CALLS_SECTION_BEGIN:
                self._state = _SECTION
                self._section_start, self._section_text = len(self._tool_calls), ""
            elif marker == TOOL_CALL_BEGIN:  # a call without its section marker
                self._start_call()
            # stray argument / call-end / section-end markers outside a section are dropped
        elif state == _SECTION:
            if marker == TOOL_CALL_BEGIN:
                self._start_call()
            elif marker == TOOL_CALLS_SECTION_END:
                self._end_section(None)
                self._state = _CONTENT
        elif marker == TOOL_CALL_ARGUMENT_BEGIN and state == _CALL_ID:
            self._state = _CALL_ARGS
            self._call_args = []
        elif marker == TOOL_CALL_END:
            self._end_call(closed=True)
            self._state = _SECTION
        elif marker == TOOL_CALL_BEGIN:
            self._end_call(closed=False)
            self._start_call()
        elif marker == TOOL_CALLS_SECTION_END:
            self._end_call(closed=False)
            self._end_section(None)
            self._state = _CONTENT
        else:  # e.g. "</think>" inside arguments is text
            self._text(marker)

    def _warn(self, warning: str) -> None:
        self._warnings.append(warning)
        self._delta.warnings.append(warning)

    def _end_section(self, cut_off: str | None) -> None:
        """The end of a ``<|tool_calls_section_begin|>`` section (``cut_off`` says how it
        ended, if not at its end marker): a warning if it held no call."""
        start, self._section_start = self._section_start, None
        held, self._section_text = self._section_text, ""
        if start is None or len(self._tool_calls) > start:
            return
        what = "nothing"
        if held:
            what = f"only the text {held[:_QUOTE].rstrip()!r}" + ("..." if len(held) > _QUOTE else "")
        ended = f" (cut off: {cut_off} inside it)" if cut_off else ""
        self._warn(f"a tool-call section held no tool call{ended}: it held {what}")

    def _start_call(self) -> None:
        self._state = _CALL_ID
        self._call_id = []
        self._call_args = None

    def _end_call(self, *, closed: bool) -> None:
        call_id = "".join(self._call_id).strip()
        raw = "" if self._call_args is None else "".join(self._call_args)
        errors = [] if closed else [f"cut off before {TOOL_CALL_END}"]
        arguments = None
        if self._call_args is None:
            errors.append(f"no {TOOL_CALL_ARGUMENT_BEGIN}")
        else:
            arguments, error = _parse_arguments(raw)
            if error:
                errors.append(error)
        recovered = False
        m = _TOOL_ID_RE.fullmatch(call_id)
        if m and self._tools and not call_id.startswith("functions.") and m.group(1) not in self._names:
            # NAME:INDEX without the prefix, naming no declared tool (call_8f2a:0): named from
            # the tools if they settle it, else read as before
            found, why = recover_tool_name(call_id, arguments, self._tools)
            if found is not None:
                self._warn(f"tool call {len(self._tool_calls)}: id {call_id!r} names no declared tool; "
                           f"named {found!r} after {why}")
            name, recovered = found or m.group(1), found is not None
        elif m:
            name = m.group(1)
        else:
            name = call_id.removeprefix("functions.")
            problem = f"id {call_id!r} is not of the form functions.NAME:INDEX"
            if self._tools:
                found, why = recover_tool_name(call_id, arguments, self._tools)
                if found is None:
                    errors.append(f"{problem} ({why})")
                else:
                    name, recovered = found, True
                    self._warn(f"tool call {len(self._tool_calls)}: {problem}; named {name!r} after {why}")
            else:
                errors.append(problem)
        call = ToolCall(call_id, name, arguments, raw, "; ".join(errors) or None, recovered)
        self._tool_calls.append(call)
        self._delta.tool_calls.append(call)


def parse_output(
    output: str | Iterable[int], *, tokenizer: Tokenizer | None = None, thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> ParsedOutput:
    """Split generated output (text, or token ids with ``tokenizer``) into reasoning, answer and tool calls.

    In thinking mode the output starts inside the reasoning (the prompt ended with
    ``<think>``); reasoning ends at ``</think>`` or where a tool-call section begins. In
    instant mode everything outside tool-call sections is answer text. A tool-call section
    is ``<|tool_calls_section_begin|>``, then per call ``<|tool_call_begin|>functions.NAME:IDX``
    ``<|tool_call_argument_begin|>{json}<|tool_call_end|>`` (no space between), then
    ``<|tool_calls_section_end|>``; problems are reported in :attr:`ToolCall.error` and
    :attr:`ParsedOutput.warnings`, never raised. ``tools`` (the tools declared to the model,
    OpenAI-style) name calls written with foreign ids: see :class:`ToolCall`.
    """
    if isinstance(output, str):
        text = output
    elif tokenizer is None:
        raise ValueError("parse_output needs a tokenizer to decode token ids")
    else:
        text = tokenizer.decode(output)
    parser = StreamParser(thinking=thinking, tools=tools)
    parser.feed(text)
    parser.close()
    return parser.result
