"""Conversations to K2.5 prompts.

:class:`ChatTemplate` renders a checkpoint's own Jinja chat template the way transformers
does; a checkpoint without one gets the built-in renderer, :func:`render`, a plain-Python
copy of K2.5's ``chat_template.jinja`` (tested equal to it on every golden case). The
tokenizer of a checkpoint folder carries the folder's template
(:attr:`kimi_jax.chat.tokenizer.Tokenizer.chat_template`), so a prompt never depends on how
the tokenizer was passed.

Both prepare their inputs as Moonshot's tokenizer does: tools are key-sorted and declared as
a TypeScript-style namespace (``kimi_jax.chat.tools``), and, as in transformers 5, message
keys whose value is ``None`` are dropped and a message's reasoning may come as
``reasoning_content``, ``thinking`` or ``reasoning``. Tool-call ids that are not K2.5's own
``functions.NAME:INDEX`` (OpenAI's ``call_...``, ``0``, Anthropic's ``toolu_...``) are
rewritten to it, with the ``tool_call_id`` of the results that answer them
(:mod:`kimi_jax.chat.tool_ids`; :func:`~kimi_jax.chat.tool_ids.normalize_tool_ids` gives
the map back to the client's ids), so a history never teaches the model foreign ids.
Conversations are checked first
(:func:`kimi_jax.chat.validate.validate_messages`): a malformed message is a ``ValueError``
naming it, never content silently left out of the prompt. Jinja templates render in a
sandbox with size, loop and time limits (:mod:`kimi_jax.chat.sandbox`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from kimi_jax.chat.sandbox import (
    LimitedSandbox,
    RenderLimits,
    new_environment,
    render_limited,
)
from kimi_jax.chat.special import (
    IM_ASSISTANT,
    IM_END,
    IM_MIDDLE,
    IM_SYSTEM,
    IM_USER,
    IMAGE_PLACEHOLDER,
    THINK,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    VIDEO_PLACEHOLDER,
)
from kimi_jax.chat.tool_ids import canonicalize_tool_ids
from kimi_jax.chat.tools import prepare_tools, tools_json
from kimi_jax.chat.validate import REASONING_KEYS, standard_json, validate_messages


def _normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages, checked (:func:`validate_messages`), without ``None`` values,
    reasoning under ``reasoning_content``, tool-call ids in K2.5's form
    (:func:`kimi_jax.chat.tool_ids.canonicalize_tool_ids`)."""
    if isinstance(messages, str | bytes | Mapping):
        raise ValueError(f"a conversation is a list of messages, got {type(messages).__name__}")
    messages = list(messages)
    validate_messages(messages)
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        out.append(message)
    return canonicalize_tool_ids(out)[0]


def _render_content(content: Any) -> str:
    """A validated message's content (see :mod:`kimi_jax.chat.validate`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        kind = part["type"]
        if kind in ("image", "image_url"):
            out.append(IMAGE_PLACEHOLDER + "\n")
        elif kind in ("video", "video_url"):
            out.append(VIDEO_PLACEHOLDER + "\n")
        else:
            out.append(part.get("text", ""))
    return "".join(out)


def _render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    out = [TOOL_CALLS_SECTION_BEGIN]
    for j, call in enumerate(tool_calls):
        args = call["function"]["arguments"]
        if not isinstance(args, str):  # standard JSON only: never NaN / Infinity
            args = standard_json(args, f"tool call {j} arguments")
        out.append(f"{TOOL_CALL_BEGIN}{call['id']}{TOOL_CALL_ARGUMENT_BEGIN}{args}{TOOL_CALL_END}")
    out.append(TOOL_CALLS_SECTION_END)
    return "".join(out)


def _render_message(message: Mapping[str, Any], keep_reasoning: bool) -> str:
    role = message["role"]
    opener = {"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM)
    out = [f"{opener}{message.get('name') or role}{IM_MIDDLE}"]
    content = _render_content(message.get("content"))
    if role == "assistant":
        reasoning = message.get("reasoning_content", "") if keep_reasoning else ""
        out.append(f"{THINK}{reasoning}{THINK_END}{content}")
        if message.get("tool_calls"):
            out.append(_render_tool_calls(message["tool_calls"]))
    elif role == "tool":
        out.append(f"## Return of {message.get('tool_call_id', '')}\n{content}")
    else:
        out.append(content)
    out.append(IM_END)
    return "".join(out)


def render(
    messages: Iterable[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """The K2.5 prompt for ``messages``, exactly as the official ``chat_template.jinja`` writes it.

    Messages are OpenAI-style dicts: ``role`` (system, user, assistant, tool, or developer,
    written as a system turn), optional ``name`` (replaces the role in the header),
    ``content`` (a string or a list of parts of type text, image / image_url, video /
    video_url), and for assistants ``reasoning_content`` and ``tool_calls``
    (``{"id", "function": {"name", "arguments"}}``, arguments a JSON string or a dict); tool
    results carry ``tool_call_id``. Ids not of the form ``functions.NAME:INDEX`` are written
    in that form (see :func:`kimi_jax.chat.tool_ids.normalize_tool_ids`). Image and video
    parts become placeholders here; their
    media are read by ``kimi_jax.media.placeholders.conversation_media`` (``kimi_jax.generate``
    does both). Conversations are checked first (:mod:`kimi_jax.chat.validate`: ``ValueError``
    naming the message, and the part or tool call).

    Reasoning is written only for assistant messages after the last assistant message
    without tool calls (the current tool-using turn), and only in thinking mode; earlier
    assistant turns get an empty ``<think></think>``. The generation prompt opens the
    assistant turn with ``<think>`` (thinking) or ``<think></think>`` (instant).
    """
    messages = _normalize_messages(messages)
    tools, tools_ts = prepare_tools(tools)
    out = []
    if tools:
        declaration = tools_ts or tools_json(tools)
        out.append(f"{IM_SYSTEM}tool_declare{IM_MIDDLE}{declaration}{IM_END}")
    current_turn = next(
        (i + 1 for i in range(len(messages) - 1, -1, -1)
         if messages[i].get("role") == "assistant" and not messages[i].get("tool_calls")),
        0,
    )
    out.extend(_render_message(m, keep_reasoning=thinking and i >= current_turn) for i, m in enumerate(messages))
    if add_generation_prompt:
        out.append(f"{IM_ASSISTANT}assistant{IM_MIDDLE}{THINK}" + ("" if thinking else THINK_END))
    return "".join(out)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson`` filter, standard JSON only (NaN / Infinity raise ``ValueError``)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys,
                      allow_nan=False)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.cache
def _jinja_environment() -> LimitedSandbox:
    """The sandboxed Jinja environment transformers renders chat templates in, with limits
    (:mod:`kimi_jax.chat.sandbox`)."""
    env = new_environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.guard_filters()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A conversation renderer: a Jinja chat template, or the built-in K2.5 :func:`render`.

    ``ChatTemplate(source)`` compiles a Jinja template; ``ChatTemplate()`` is the built-in.
    ``origin`` names where the source came from in errors (a syntax error is a ``ValueError``
    naming it and the line). ``limits`` bound each render of a Jinja template (output size,
    sizes of strings and lists built, loop iterations, time; see
    :class:`~kimi_jax.chat.sandbox.RenderLimits`); past one, rendering raises
    :class:`~kimi_jax.chat.sandbox.TemplateLimitError`, a ``ValueError``.
    """

    def __init__(self, source: str | None = None, *, origin: str = "chat template",
                 limits: RenderLimits | None = None):
        self.source = source
        self.limits = limits or RenderLimits()
        if source is None:
            self._template = None
            return
        if not isinstance(source, str):
            raise ValueError(f"{origin}: the chat template is a {type(source).__name__}, not a string")
        try:
            self._template = _jinja_environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin}, line {e.lineno}: template syntax error: {e.message}") from None

    @property
    def is_builtin(self) -> bool:
        """Whether this renders with the built-in :func:`render`."""
        return self._template is None

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate:
        """The template of a checkpoint folder.

        ``chat_template.jinja`` if present, else ``chat_template`` in ``tokenizer_config.json``
        (a string, or a list of ``{name, template}`` from which ``default`` is taken), else
        the built-in renderer.
        """
        path = Path(path)
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), origin=str(jinja_file))
        config_file = path / "tokenizer_config.json"
        if not config_file.is_file():
            return cls()
        try:
            template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template}
            if "default" not in named:
                raise ValueError(f"{config_file}: chat_template lists no template named 'default'")
            template = named["default"]
        return cls(template, origin=f"{config_file} (chat_template)")

    def render(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = True,
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """The prompt text for ``messages`` (see :func:`render` for the message format).

        A Jinja template gets ``messages``, ``tools`` (key-sorted), ``tools_ts_str`` (see
        :func:`tools_to_typescript`; left out when the schemas cannot be expressed),
        ``add_generation_prompt``, ``thinking`` and any ``template_vars``; the built-in
        renderer takes no ``template_vars``.
        """
        if self._template is None:
            if template_vars:
                raise TypeError(f"the built-in renderer takes no template variables, got {sorted(template_vars)}")
            return render(messages, tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt)
        tools, tools_ts = prepare_tools(tools)
        variables: dict[str, Any] = {
            "messages": _normalize_messages(messages),
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "thinking": thinking,
        }
        if tools_ts is not None:
            variables["tools_ts_str"] = tools_ts
        return render_limited(self._template, {**variables, **template_vars}, self.limits)
