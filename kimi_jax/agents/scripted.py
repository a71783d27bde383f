"""A stand-in for the serving engine that replies from a script, token by token, in real K2.5
tokens: for testing agents, tools and scripted conversations without a model.

``script(prompt_text)`` returns the reply text (special-token strings included: reasoning,
``</think>``, tool-call sections), which is encoded with the real tokenizer and followed by
``<|im_end|>``. Like the engine, each :meth:`ScriptedEngine.step` serves up to ``max_slots``
requests at once: a new request reads its prompt in one step, then every running request
gets one token per step.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from kimi_jax.chat.tokenizer import Tokenizer


@dataclasses.dataclass(eq=False)
class ScriptedRequest:
    """A request of :class:`ScriptedEngine`: its prompt, the reply it will emit, what it emitted so far."""

    prompt_ids: list[int]
    reply: list[int]
    on_token: Callable[[int], None] | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    cached_prefix: int = 0
    reading: bool = True


class ScriptedEngine:
    """Serves requests like :class:`~kimi_jax.inference.engine.Engine` (``submit`` / ``step`` /
    ``cancel`` / ``stats``), replying with ``script(prompt_text)``. ``prompts`` records every
    prompt submitted, ``widest`` the most requests served in one step."""

    def __init__(self, tokenizer: Tokenizer, script: Callable[[str], str], *, max_slots: int = 64,
                 max_length: int = 1 << 16):
        self.tokenizer, self.script, self.max_slots, self.max_length = tokenizer, script, max_slots, max_length
        self.waiting: collections.deque[ScriptedRequest] = collections.deque()
        self.running: list[ScriptedRequest] = []
        self.prompts: list[list[int]] = []
        self.steps = 0
        self.widest = 0

    def submit(self, prompt_ids, *, max_new_tokens, stop_ids=(), on_token=None, **sampling) -> ScriptedRequest:
        self.prompts.append(list(prompt_ids))
        text = self.script(self.tokenizer.decode(prompt_ids))
        reply = self.tokenizer.encode(text, allow_special=True) + [self.tokenizer.im_end_id]
        request = ScriptedRequest(list(prompt_ids), reply[:max_new_tokens], on_token)
        self.waiting.append(request)
        return request

    def step(self) -> None:
        self.steps += 1
        while self.waiting and len(self.running) < self.max_slots:
            self.running.append(self.waiting.popleft())
        self.widest = max(self.widest, len(self.running))
        for request in list(self.running):
            if request.reading:
                request.reading = False
                continue
            token = request.reply[len(request.token_ids)]
            request.token_ids.append(token)
            if len(request.token_ids) == len(request.reply):
                request.done = True
                request.finish_reason = "stop" if token == self.tokenizer.im_end_id else "length"
                self.running.remove(request)
            if request.on_token is not None:
                request.on_token(token)

    def cancel(self, request: ScriptedRequest) -> None:
        request.done, request.finish_reason = True, "cancelled"
        if request in self.running:
            self.running.remove(request)

    def stats(self) -> dict[str, int]:
        return {"steps": self.steps}


SECTION, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"


def calls(*pairs: tuple[str, str]) -> str:
    """A tool-call section of ``(id, raw arguments)`` calls."""
    return SECTION + "".join(f"<|tool_call_begin|>{i}<|tool_call_argument_begin|>{a}<|tool_call_end|>"
                             for i, a in pairs) + SECTION_END


def last_user(prompt: str) -> str:
    """The text of the last user turn of a rendered prompt."""
    return prompt.rsplit("<|im_user|>user<|im_middle|>", 1)[1].split("<|im_end|>", 1)[0]


def returns(prompt: str) -> int:
    """How many tool results the rendered prompt holds."""
    return prompt.count("## Return of")
