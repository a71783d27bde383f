"""Schema-valid tool calls: token masks that keep K2.5's tool-call sections to the declared
tools and their JSON schemas, built with llguidance for the checkpoint's tiktoken vocabulary.

A request with tools gets a :class:`ToolCallConstraint` (the engine's
:class:`~kimi_jax.inference.engine.TokenConstraint`). Outside a tool-call section the model
writes freely, except for the markers that only belong inside one; once it writes
``<|tool_calls_section_begin|>``, a grammar takes over until ``<|tool_calls_section_end|>``::

    section: (<|tool_call_begin|> "functions.NAME:" INDEX <|tool_call_argument_begin|> JSON <|tool_call_end|>)+
             <|tool_calls_section_end|>

NAME is a declared tool's, JSON is valid against that tool's ``parameters`` schema (written
with ``", "`` / ``": "`` separators and no other whitespace). ``tool_choice`` ``"required"``
or a named function forces a section: after the reasoning (``</think>``; the reasoning may
not end the turn), or at once in Instant mode; a named function is the only one the
section may call. A section is followed by the end of the turn (``<|im_end|>``), as K2.5 writes it. ``"none"`` forbids the section. ``parallel_tool_calls=False`` allows one
call per section.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np
from llguidance.tiktoken import lltokenizer_from_encoding

from kimi_jax.chat import special
from kimi_jax.chat.tokenizer import Tokenizer

JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How constrained arguments are written (llguidance's ``x-guidance`` options)."""

INDEX_DIGITS = 4
"""The most digits a call id's INDEX may have."""


class ToolGrammarError(ValueError):
    """A tool's parameters schema cannot be compiled into a grammar."""


def _tool_functions(tools: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each OpenAI-style tool (``{"type": "function", "function": {...}}``)."""
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolGrammarError(f"tool {i} is not a function with a name")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object"}
        if not isinstance(parameters, Mapping):
            raise ToolGrammarError(f"tool {function['name']!r}: parameters must be a JSON schema object")
        out.append((function["name"], dict(parameters)))
    return out


def section_grammar(tools: Sequence[Mapping[str, Any]], *, only: str | None = None, parallel: bool = True) -> str:
    """The Lark grammar (llguidance's dialect) of a tool-call section after its opening marker.

    ``only`` restricts the calls to one tool; ``parallel`` False allows one call."""
    functions = _tool_functions(tools)
    if only is not None:
        functions = [(n, p) for n, p in functions if n == only]
        if not functions:
            raise ToolGrammarError(f"tool_choice names {only!r}, which is not among the tools")
    if not functions:
        raise ToolGrammarError("no tools to call")
    rules = [
        f"start: call{'+' if parallel else ''} {special.TOOL_CALLS_SECTION_END}",
        f"call: {special.TOOL_CALL_BEGIN} ({' | '.join(f'f{i}' for i in range(len(functions)))}) "
        f"{special.TOOL_CALL_END}",
        f"INDEX: /[0-9]{{1,{INDEX_DIGITS}}}/",
    ]
    for i, (name, parameters) in enumerate(functions):
        schema = {**parameters, "x-guidance": JSON_FORMAT}
        rules.append(f"f{i}: {json.dumps(f'functions.{name}:')} INDEX {special.TOOL_CALL_ARGUMENT_BEGIN} a{i}")
        rules.append(f"a{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    return "\n".join(rules) + "\n"


class ToolGrammar:
    """The llguidance view of one tokenizer: its vocabulary and the marker ids; builds
    :class:`ToolCallConstraint` s. Building it takes about a second for K2.5's vocabulary."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.lltokenizer = lltokenizer_from_encoding(
            tokenizer._enc, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.im_end_id
        )
        ids = tokenizer.special_id
        self.section_begin = ids(special.TOOL_CALLS_SECTION_BEGIN)
        self.think_end = ids(special.THINK_END)
        self.in_section_only = [ids(m) for m in (special.TOOL_CALL_BEGIN, special.TOOL_CALL_ARGUMENT_BEGIN,
                                                 special.TOOL_CALL_END, special.TOOL_CALLS_SECTION_END)]
        self.ends = list(tokenizer.stop_ids)

    def mask(self, allow: Sequence[int] | None = None, deny: Sequence[int] = ()) -> np.ndarray:
        """A uint32 bitmask of the vocabulary: only ``allow`` (every id when ``None``) less ``deny``."""
        words = -(-self.vocab_size // 32)
        bits = np.zeros(words * 32, bool)
        bits[: self.vocab_size] = allow is None
        bits[list(allow or ())] = True
        bits[list(deny)] = False
        return np.packbits(bits, bitorder="little").view(np.uint32)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one grammar per server, kept for its life
    def _checked(self, lark: str) -> str:
        """llguidance's grammar for a Lark text, checked against the vocabulary."""
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            raise ToolGrammarError(f"the tools' schemas cannot be compiled into a grammar: {messages[0]}")
        return grammar

    def constraint(
        self, tools: Sequence[Mapping[str, Any]], choice: str | Mapping[str, Any] = "auto", *, thinking: bool,
        parallel: bool = True,
    ) -> ToolCallConstraint:
        """The constraint for a request with ``tools`` and OpenAI's ``tool_choice`` (``"auto"``,
        ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name": NAME}}``)."""
        only = None
        if isinstance(choice, Mapping):
            only = (choice.get("function") or {}).get("name")
            if not isinstance(only, str):
                raise ToolGrammarError("tool_choice must be auto, none, required or "
                                       "{'type': 'function', 'function': {'name': NAME}}")
            choice = "required"
        if choice not in ("auto", "none", "required"):
            raise ToolGrammarError(f"tool_choice {choice!r} is not auto, none, required or a named function")
        grammar = None if choice == "none" else self._checked(section_grammar(tools, only=only, parallel=parallel))
        return ToolCallConstraint(self, grammar, forced=choice == "required", thinking=thinking)


class ToolCallConstraint:
    """Follows one request's tokens and gives the mask of the next (see the module's docstring)."""

    def __init__(self, grammar: ToolGrammar, section: str | None, *, forced: bool, thinking: bool):
        self._g = grammar
        self._section = section  # None: no tool calls allowed
        self._forced = forced
        self._reasoning = thinking
        self._matcher: llguidance.LLMatcher | None = None
        self._closing = False  # the section has ended: the turn ends next
        self._done = False  # the turn has ended (or the grammar failed): no more masks
        self.failed: str | None = None
        """Why the grammar stopped constraining, if it failed (a token outside it)."""

    def mask(self) -> np.ndarray | None:
        g = self._g
        if self._done:
            return None
        if self._closing:
            return g.mask(allow=g.ends)
        if self._matcher is not None:
            bitmask = llguidance.numpy.allocate_token_bitmask(1, g.vocab_size)
            llguidance.numpy.fill_next_token_bitmask(self._matcher, bitmask)
            return bitmask[0].view(np.uint32)
        if self._section is None:
            return g.mask(deny=[g.section_begin, *g.in_section_only])
        if self._forced and not self._reasoning:
            return g.mask(allow=[g.section_begin])
        return g.mask(deny=g.in_section_only + (g.ends if self._forced else []))

    def accept(self, token: int) -> None:
        g = self._g
        if self._done or self._closing:
            self._done = True
            return
        if self._matcher is not None:
            if not self._matcher.consume_token(token):
                self.failed = self._matcher.get_error() or f"token {token} is outside the tool-call grammar"
                self._done = True
            elif self._matcher.is_stopped():
                self._closing = True
        elif token == g.think_end:
            self._reasoning = False
        elif token == g.section_begin and self._section is not None:
            self._reasoning = False
            self._matcher = llguidance.LLMatcher(g.lltokenizer, self._section)
