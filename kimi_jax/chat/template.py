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
``reasoning_content``, ``thinking`` or ``reasoning``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
from kimi_jax.chat.tools import prepare_tools

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages without ``None`` values, reasoning under ``reasoning_content``."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"a chat message must be a mapping, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        out.append(message)
    return out


def _render_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        if not isinstance(part, Mapping):
            raise TypeError(f"a content part must be a mapping, got {type(part).__name__}")
        kind = part.get("type")
        if kind in ("image", "image_url"):
            out.append(IMAGE_PLACEHOLDER + "\n")
        elif kind in ("video", "video_url"):
            out.append(VIDEO_PLACEHOLDER + "\n")
        else:
            out.append(str(part.get("text", "")))
    return "".join(out)


def _render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    out = [TOOL_CALLS_SECTION_BEGIN]
    for call in tool_calls:
        args = call["function"]["arguments"]
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append(f"{TOOL_CALL_BEGIN}{call.get('id', '')}{TOOL_CALL_ARGUMENT_BEGIN}{args}{TOOL_CALL_END}")
    out.append(TOOL_CALLS_SECTION_END)
    return "".join(out)


def _render_message(message: Mapping[str, Any], keep_reasoning: bool) -> str:
    if "role" not in message:
        raise ValueError(f"chat message without a role: {message!r}")
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

    Messages are OpenAI-style dicts: ``role`` (system, user, assistant, tool; any other role
    is written as a system turn), optional ``name`` (replaces the role in the header),
    ``content`` (a string or a list of parts of type text, image / image_url, video /
    video_url), and for assistants ``reasoning_content`` and ``tool_calls``
    (``{"id", "function": {"name", "arguments"}}``, arguments a JSON string or a dict); tool
    results carry ``tool_call_id``. Image and video parts become placeholders here; their
    media are read by ``kimi_jax.media.placeholders.conversation_media`` (``kimi_jax.generate``
    does both).

    Reasoning is written only for assistant messages after the last assistant message
    without tool calls (the current tool-using turn), and only in thinking mode; earlier
    assistant turns get an empty ``<think></think>``. The generation prompt opens the
    assistant turn with ``<think>`` (thinking) or ``<think></think>`` (instant).
    """
    messages = _normalize_messages(messages)
    tools, tools_ts = prepare_tools(tools)
    out = []
    if tools:
        declaration = tools_ts or json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
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
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.cache
def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A conversation renderer: a Jinja chat template, or the built-in K2.5 :func:`render`.

    ``ChatTemplate(source)`` compiles a Jinja template; ``ChatTemplate()`` is the built-in.
    """

    def __init__(self, source: str | None = None):
        self.source = source
        self._template = None if source is None else _jinja_environment().from_string(source)

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
            return cls(jinja_file.read_text(encoding="utf-8"))
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
        return cls(template)

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
        return self._template.render(**variables, **template_vars)
