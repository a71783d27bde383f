"""Tool-call ids in K2.5's own form, ``functions.NAME:INDEX``, both ways.

K2.5 names a tool call only by its id: ``functions.get_weather:0`` is the one place the
function's name appears in the context, and INDEX is a running count of the tool calls in
the conversation (0 for the first call, whatever message it is in). Clients of the OpenAI,
Anthropic or other APIs send histories whose calls carry their own ids (``call_8f2a...``,
``0``, ``toolu_01...``); rendered as they are, such histories teach the model to write
those, and its calls lose their names.

Rendering (:mod:`kimi_jax.chat.template`) therefore rewrites them
(:func:`normalize_tool_ids`): an assistant tool call whose id is not
``functions.{its function name}:{digits}`` gets ``functions.NAME:INDEX``, INDEX being the
call's position among all the conversation's tool calls (the next free index if a call
that keeps its id already holds that one), and the tool results that answer it get the new
id as ``tool_call_id``. Calls whose ids already have K2.5's form keep them, so such
conversations render exactly as before. The :class:`ToolIdMap` that comes back maps the new
ids to the client's, for whoever hands the client back its own ids.

The other way, :func:`recover_tool_name` finds the function of a call the model wrote with a
foreign id, from the declared tools (used by :mod:`kimi_jax.chat.parser`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kimi_jax.chat.validate import validate_messages

ID_PREFIX = "functions."
_INDEX_RE = re.compile(r"[0-9]+")


def is_canonical_id(call_id: str, name: str) -> bool:
    """Whether ``call_id`` is ``functions.{name}:{INDEX}`` (INDEX ASCII digits)."""
    head = f"{ID_PREFIX}{name}:"
    return call_id.startswith(head) and _INDEX_RE.fullmatch(call_id, len(head)) is not None


def canonical_id(name: str, index: int) -> str:
    """K2.5's id for the ``index``-th tool call of a conversation, a call of ``name``."""
    return f"{ID_PREFIX}{name}:{index}"


@dataclasses.dataclass(frozen=True)
class ToolIdMap:
    """The tool-call ids rendering rewrote: ``client_ids`` maps each new id
    (``functions.NAME:INDEX``) to the id the client gave that call.

    Empty (and false) when every id was already in K2.5's form. Only ids of the rendered
    history are in it: the ids of calls the model writes next are its own, not the
    client's, and should not be passed through :meth:`to_client`.
    """

    client_ids: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.client_ids)

    def to_client(self, tool_call_id: str) -> str:
        """The client's id for a rewritten id; any other id as it is."""
        return self.client_ids.get(tool_call_id, tool_call_id)

    def restore(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``message`` with the client's ids back in its ``tool_calls`` and
        ``tool_call_id`` (the message itself is not changed)."""
        out = dict(message)
        if isinstance(out.get("tool_call_id"), str):
            out["tool_call_id"] = self.to_client(out["tool_call_id"])
        if isinstance(out.get("tool_calls"), list | tuple):
            out["tool_calls"] = [
                {**call, "id": self.to_client(call["id"])}
                if isinstance(call, Mapping) and isinstance(call.get("id"), str) else call
                for call in out["tool_calls"]
            ]
        return out


def canonicalize_tool_ids(messages: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], ToolIdMap]:
    """:func:`normalize_tool_ids` without the checks: ``messages`` must already be valid
    (:func:`kimi_jax.chat.validate.validate_messages`). Returns shallow copies of the messages
    (a rewritten message also gets a copy of its ``tool_calls``) and the id map."""
    messages = [dict(m) for m in messages]
    calls = [(i, j, call) for i, m in enumerate(messages) if m.get("role") == "assistant"
             for j, call in enumerate(m.get("tool_calls") or ())]
    used = {call["id"] for _, _, call in calls if is_canonical_id(call["id"], call["function"]["name"])}
    if all(is_canonical_id(c["id"], c["function"]["name"]) for _, _, c in calls):
        return messages, ToolIdMap()
    client_ids: dict[str, str] = {}
    rewritten: dict[tuple[int, int], str] = {}
    for position, (i, j, call) in enumerate(calls):
        name = call["function"]["name"]
        if is_canonical_id(call["id"], name):
            continue
        index = position
        while canonical_id(name, index) in used:
            index += 1
        new_id = canonical_id(name, index)
        used.add(new_id)
        rewritten[i, j] = new_id
        client_ids[new_id] = call["id"]
    # Tool results answer the calls of the latest assistant message that used their id;
    # several calls of one message sharing an id are answered in order.
    pending: dict[str, list[str]] = {}
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            latest: dict[str, list[str]] = {}
            new_calls = []
            for j, call in enumerate(message["tool_calls"]):
                new_id = rewritten.get((i, j))
                if new_id is not None:
                    latest.setdefault(call["id"], []).append(new_id)
                    call = {**call, "id": new_id}
                else:
                    latest[call["id"]] = []  # a kept id shadows an older rewritten one
                new_calls.append(call)
            pending.update(latest)
            message["tool_calls"] = new_calls
        elif role == "tool":
            targets = pending.get(message.get("tool_call_id"))
            if targets:
                message["tool_call_id"] = targets.pop(0) if len(targets) > 1 else targets[0]
    return messages, ToolIdMap(client_ids)


def normalize_tool_ids(messages: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], ToolIdMap]:
    """Copies of ``messages`` with every assistant tool-call id in K2.5's form, and the map
    back to the client's ids (see the module docstring; the messages given are not changed).

    The conversation is checked first (``ValueError`` naming a malformed message). Keys
    whose value is ``None`` are left as they are. ``ToolIdMap()`` (empty) when every id
    already had K2.5's form.
    """
    if isinstance(messages, str | bytes | Mapping):
        raise ValueError(f"a conversation is a list of messages, got {type(messages).__name__}")
    messages = list(messages)
    validate_messages(messages)
    cleaned = [{k: v for k, v in m.items() if v is not None} for m in messages]
    normalized, id_map = canonicalize_tool_ids(cleaned)
    if not id_map:
        return [dict(m) for m in messages], id_map
    return [
        {**original, **{k: new[k] for k in ("tool_calls", "tool_call_id") if k in new}}
        for original, new in zip(messages, normalized, strict=True)
    ], id_map


# ---- recovering the function of a call the model wrote with a foreign id


@dataclasses.dataclass(frozen=True)
class DeclaredTool:
    """A declared function: its name, and the top-level property names of its parameters
    and which of them are required."""

    name: str
    properties: frozenset[str]
    required: frozenset[str]

    def matches(self, arguments: Mapping[str, Any]) -> bool:
        """Whether the argument keys fit the parameters: every required property is given and
        every key is a declared property (``required <= keys <= properties``)."""
        return self.required <= arguments.keys() <= self.properties


def declared_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[DeclaredTool]:
    """The function tools of an OpenAI-style ``tools`` list (``{"type": "function",
    "function": {"name", "parameters"}}``), as the chat template declares them; other
    entries are skipped. Parameters without ``properties`` take no arguments."""
    if tools is None:
        return []
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool mappings, got {type(tools).__name__}")
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        parameters = parameters if isinstance(parameters, Mapping) else {}
        properties = parameters.get("properties")
        required = parameters.get("required")
        out.append(DeclaredTool(
            function["name"],
            frozenset(properties) if isinstance(properties, Mapping) else frozenset(),
            frozenset(r for r in required if isinstance(r, str)) if isinstance(required, list | tuple) else frozenset(),
        ))
    return out


def recover_tool_name(
    call_id: str, arguments: Mapping[str, Any] | None, tools: Sequence[DeclaredTool],
) -> tuple[str | None, str]:
    """The function a call with a foreign id (not ``functions.NAME:INDEX``) is for, and why.

    In order: the declared tool the id names (``get_weather`` or ``functions.get_weather``
    without an index); the only declared tool; the one declared tool whose parameters match
    the argument keys (:meth:`DeclaredTool.matches`). Returns ``(name, reason)``, or
    ``(None, why not)`` when none of these settles it (no tools, arguments that are not an
    object, no tool or several tools matching).
    """
    names = sorted({t.name for t in tools})
    if not names:
        return None, "no tools declared"
    bare = call_id.removeprefix(ID_PREFIX)
    if bare in names:
        return bare, "its id names a declared tool"
    if len(names) == 1:
        return names[0], "the only declared tool"
    if arguments is None:
        return None, "its arguments are not an object to match the declared tools against"
    matching = sorted({t.name for t in tools if t.matches(arguments)})
    if len(matching) == 1:
        return matching[0], "the only declared tool whose parameters match its argument keys"
    if not matching:
        return None, "no declared tool's parameters match its argument keys"
    return None, f"the argument keys match {len(matching)} declared tools ({', '.join(matching)})"
