"""Generated tokens to OpenAI message deltas, read by token id.

Markers are recognized by their special ids, never by their text, so a literal
``<|tool_call_begin|>`` the model writes as plain text (inside arguments, say) stays text;
no special token ever reaches the content, the reasoning or the arguments. The rules are
those of :func:`kimi_jax.chat.parser.parse_output`: in Thinking mode the output starts in
the reasoning, which ends at ``</think>`` or where a tool-call section begins; a call is
``<|tool_call_begin|>ID<|tool_call_argument_begin|>ARGUMENTS<|tool_call_end|>``, its function
named by its id (``functions.NAME:INDEX``); ``<|im_end|>`` / ``[EOS]`` end the output.
A call's id and name are reported when its arguments begin, then the argument text as it comes.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from collections.abc import Sequence

from kimi_jax.chat import special
from kimi_jax.chat.tokenizer import Tokenizer

_ID_RE = re.compile(r"(?:functions\.)?(.+):(\d+)", re.DOTALL)


@dataclasses.dataclass
class CallDelta:
    """A piece of tool call ``index``: its ``id`` and ``name`` (first piece only) or argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclasses.dataclass
class Delta:
    """What some tokens added."""

    reasoning: str = ""
    content: str = ""
    calls: list[CallDelta] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls)


@dataclasses.dataclass
class Call:
    """A tool call as written: ``arguments`` is the raw text; ``complete`` once ``<|tool_call_end|>`` came."""

    id: str
    name: str
    arguments: str = ""
    complete: bool = False


def call_name(call_id: str) -> str:
    """The function a call id names: NAME of ``functions.NAME:INDEX`` (or ``NAME:INDEX``), else the id less ``functions.``."""
    m = _ID_RE.fullmatch(call_id)
    return m.group(1) if m else call_id.removeprefix("functions.")


_REASONING, _CONTENT, _SECTION, _CALL_ID, _CALL_ARGS, _DONE = range(6)


class OutputStream:
    """Feed generated token ids one at a time; each :meth:`feed` returns what the token added.

    ``stop`` strings end the content where they first appear (:attr:`stopped` turns true and
    the rest is dropped); content that might begin one is held back until it cannot.
    """

    def __init__(self, tokenizer: Tokenizer, *, thinking: bool, stop: Sequence[str] = ()):
        self._tok = tokenizer
        ids = tokenizer.special_id
        self._markers = {
            ids(special.THINK): "think", ids(special.THINK_END): "think_end",
            ids(special.TOOL_CALLS_SECTION_BEGIN): "section_begin", ids(special.TOOL_CALLS_SECTION_END): "section_end",
            ids(special.TOOL_CALL_BEGIN): "call_begin", ids(special.TOOL_CALL_ARGUMENT_BEGIN): "argument_begin",
            ids(special.TOOL_CALL_END): "call_end", **{i: "end" for i in tokenizer.stop_ids},
        }
        self._special = set(tokenizer.special_tokens.values())
        self._state = _REASONING if thinking else _CONTENT
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""  # content held back while it may be the start of a stop string
        self._call_id: list[str] = []
        self.reasoning = ""
        self.content = ""
        self.calls: list[Call] = []
        self.stopped = False

    @property
    def done(self) -> bool:
        """The output has ended: ``<|im_end|>`` / ``[EOS]`` or a stop string came."""
        return self._state == _DONE

    def feed(self, token: int) -> Delta:
        delta = Delta()
        if self._state == _DONE:
            return delta
        marker = self._markers.get(token)
        if marker is None and token in self._special:
            marker = "other"
        if marker is None:
            self._text(self._utf8.decode(self._tok.decode_bytes([token])), delta)
            return delta
        self._text(self._utf8.decode(b"", final=True), delta)
        self._marker(marker, delta)
        return delta

    def close(self) -> Delta:
        """The end of the output: whatever was held back."""
        delta = Delta()
        if self._state != _DONE:
            self._text(self._utf8.decode(b"", final=True), delta)
            self._flush_held(delta)
            self._state = _DONE
        return delta

    def _marker(self, marker: str, delta: Delta) -> None:
        state = self._state
        if marker == "end":
            self._flush_held(delta)
            self._state = _DONE
        elif marker == "other":
            pass  # media or reserved ids: never text
        elif state in (_REASONING, _CONTENT):
            if marker == "think":
                self._state = _REASONING
            elif marker == "think_end":
                self._state = _CONTENT
            elif marker == "section_begin":
                self._state = _SECTION
            elif marker == "call_begin":
                self._start_call()
        elif marker == "call_begin":
            self._start_call()
        elif marker == "argument_begin" and state == _CALL_ID:
            call_id = "".join(self._call_id).strip()
            self.calls.append(Call(call_id, call_name(call_id)))
            delta.calls.append(CallDelta(len(self.calls) - 1, call_id, self.calls[-1].name))
            self._state = _CALL_ARGS
        elif marker == "call_end":
            if state == _CALL_ARGS:
                self.calls[-1].complete = True
            self._state = _SECTION
        elif marker == "section_end":
            self._state = _CONTENT

    def _start_call(self) -> None:
        self._state = _CALL_ID
        self._call_id = []

    def _text(self, text: str, delta: Delta) -> None:
        if not text:
            return
        state = self._state
        if state == _REASONING:
            self.reasoning += text
            delta.reasoning += text
        elif state == _CONTENT:
            self._content(text, delta)
        elif state == _CALL_ID:
            self._call_id.append(text)
        elif state == _CALL_ARGS:
            self.calls[-1].arguments += text
            delta.calls.append(CallDelta(len(self.calls) - 1, arguments=text))

    def _content(self, text: str, delta: Delta) -> None:
        if not self._stop:
            self.content += text
            delta.content += text
            return
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._held = ""
            self._emit(text[: min(hits)], delta)
            self.stopped = True
            self._state = _DONE
            return
        keep = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:]
        self._emit(text[: len(text) - keep], delta)

    def _emit(self, text: str, delta: Delta) -> None:
        self.content += text
        delta.content += text

    def _flush_held(self, delta: Delta) -> None:
        held, self._held = self._held, ""
        self._emit(held, delta)
