"""Conversation checks made before any rendering, so that a malformed message is an error that
names it instead of a prompt that silently lost part of it.

The official K2.5 Jinja template renders whatever it is given: it drops message content given as
a dict or a list of strings, writes a message without a role as a system turn, renders a tool
call without an id as an anonymous call, and ignores keys it does not know. Both renderers
(:class:`kimi_jax.chat.template.ChatTemplate` and the built-in
:func:`kimi_jax.chat.template.render`) therefore pass every conversation through
:func:`validate_messages` first. The rules:

- A conversation is a list of mappings. Each has a ``role``: ``system``, ``user``,
  ``assistant``, ``tool``, or ``developer`` (OpenAI's name for system instructions; written as
  a system turn headed ``developer``, as the official template writes any role it does not
  know). Any other role, or none, is an error: a mistyped ``"usr"`` would otherwise become a
  system turn.
- ``name``, if given, is a string (it replaces the role in the turn's header).
- ``content`` is absent / ``None``, a string, or a list of parts. A dict, or a list holding
  strings, is an error (not normalized: how strings would be joined is ambiguous); wrap text
  as ``[{"type": "text", "text": ...}]``.
- A part is a mapping with a ``type``: ``text`` (its ``text``, if present, a string),
  ``image`` / ``image_url`` or ``video`` / ``video_url`` (their sources are read by
  ``kimi_jax.media``). Other part types (audio, files, ...) are errors.
- Reasoning (``reasoning_content``, or its aliases ``thinking`` / ``reasoning``) is a string,
  on assistant messages only; two aliases with different values are an error.
- ``tool_calls`` only on assistant messages: a list of ``{"id": str, "type": "function"
  (optional), "function": {"name": str, "arguments": str | dict}}``. Dict arguments must be
  standard JSON (no NaN / Infinity, nested at most :data:`MAX_JSON_DEPTH` deep); string
  arguments are written as they are (the model's own text).
- Tool results (role ``tool``) carry a string ``tool_call_id``; other roles carry none.
- ``function_call`` (OpenAI's legacy single call) is refused: pass ``tool_calls``.

Keys whose value is ``None`` count as absent. Other keys are ignored (metadata such as ids or
timestamps). Errors are ``ValueError`` naming the message index, and the part or call index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")
"""Accepted message roles; ``developer`` renders as a system turn."""

TEXT_PART = "text"
MEDIA_PARTS = ("image", "image_url", "video", "video_url")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

MAX_JSON_DEPTH = 100
"""Deepest nesting of lists / objects accepted in dict tool-call arguments (and tool schemas)."""


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists / tuples / mappings more than ``limit`` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def standard_json(value: Any, where: str) -> str:
    """``value`` as compact standard JSON, or ``ValueError`` naming ``where`` (too deep, NaN /
    Infinity, values JSON cannot hold)."""
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise ValueError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not standard JSON ({e})") from None


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_content(content: Any, where: str) -> None:
    if content is None or isinstance(content, str):
        return
    if isinstance(content, Mapping):
        raise ValueError(
            f"{where}: content is a {_type_name(content)}; give a string or a list of parts, "
            "e.g. [{'type': 'text', 'text': ...}]"
        )
    if not isinstance(content, list | tuple):
        raise ValueError(f"{where}: content is a {_type_name(content)}; give a string or a list of parts")
    for j, part in enumerate(content):
        at = f"{where}, part {j}"
        if isinstance(part, str):
            raise ValueError(f"{at} is a string; a text part is {{'type': 'text', 'text': ...}}")
        if not isinstance(part, Mapping):
            raise ValueError(f"{at} is a {_type_name(part)}, not a mapping with a 'type'")
        kind = part.get("type")
        if kind == TEXT_PART:
            text = part.get("text", "")
            if not isinstance(text, str):
                raise ValueError(f"{at}: 'text' is a {_type_name(text)}, not a string")
        elif kind is None:
            raise ValueError(f"{at} has no 'type' (one of {', '.join((TEXT_PART, *MEDIA_PARTS))})")
        elif kind not in MEDIA_PARTS:
            raise ValueError(
                f"{at}: unknown part type {kind!r:.60} (expected one of {', '.join((TEXT_PART, *MEDIA_PARTS))})"
            )


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list | tuple):
        raise ValueError(f"{where}: tool_calls is a {_type_name(calls)}, not a list")
    for j, call in enumerate(calls):
        at = f"{where}, tool call {j}"
        if not isinstance(call, Mapping):
            raise ValueError(f"{at} is a {_type_name(call)}, not a mapping")
        if not isinstance(call.get("id"), str):
            raise ValueError(f"{at}: 'id' must be a string (K2.5 ids are functions.NAME:INDEX), got "
                             f"{_type_name(call.get('id'))}")
        if call.get("type", "function") != "function":
            raise ValueError(f"{at}: type {call['type']!r:.60} is not 'function'")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise ValueError(f"{at}: 'function' must be a mapping with 'name' and 'arguments'")
        if not isinstance(function.get("name"), str):
            raise ValueError(f"{at}: function 'name' must be a string")
        arguments = function.get("arguments")
        if isinstance(arguments, Mapping):
            standard_json(arguments, f"{at}: arguments")
        elif not isinstance(arguments, str):
            raise ValueError(f"{at}: arguments must be a JSON string or a dict, got {_type_name(arguments)}")


def validate_message(index: int, message: Any) -> None:
    """Check one message (see the module docstring); ``ValueError`` naming ``index``."""
    where = f"message {index}"
    if not isinstance(message, Mapping):
        raise ValueError(f"{where} is a {_type_name(message)}, not a mapping with 'role' and 'content'")
    message = {k: v for k, v in message.items() if v is not None}
    role = message.get("role")
    if role is None:
        raise ValueError(f"{where} has no 'role' (one of {', '.join(ROLES)})")
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r:.60} (expected one of {', '.join(ROLES)})")
    if "name" in message and not isinstance(message["name"], str):
        raise ValueError(f"{where}: 'name' must be a string, got {_type_name(message['name'])}")
    _check_content(message.get("content"), where)
    reasoning = {k: message[k] for k in REASONING_KEYS if k in message}
    if reasoning:
        if role != "assistant":
            raise ValueError(f"{where}: only assistant messages carry reasoning ({', '.join(reasoning)})")
        for key, value in reasoning.items():
            if not isinstance(value, str):
                raise ValueError(f"{where}: {key} must be a string, got {_type_name(value)}")
        if len(set(reasoning.values())) > 1:
            raise ValueError(f"{where}: {' and '.join(reasoning)} differ; give the reasoning once")
    if "tool_calls" in message:
        if role != "assistant":
            raise ValueError(f"{where}: only assistant messages carry tool_calls")
        _check_tool_calls(message["tool_calls"], where)
    if "function_call" in message:
        raise ValueError(f"{where}: 'function_call' is not supported; pass 'tool_calls'")
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise ValueError(f"{where}: a tool result needs a string 'tool_call_id' (the id of the call it answers)")
    elif "tool_call_id" in message:
        raise ValueError(f"{where}: only tool messages carry a tool_call_id")


def validate_messages(messages: Any) -> None:
    """Check a conversation (see the module docstring); ``ValueError`` naming the first bad message."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ValueError(f"a conversation is a list of messages, got {_type_name(messages)}")
    for i, message in enumerate(messages):
        validate_message(i, message)
