"""Kimi K2.5's chat format: conversations to prompts, and model output back to messages.

Two renderers give the same prompt text:

* :func:`render`, a plain-Python copy of the K2.5 ``chat_template.jinja``;
* :class:`ChatTemplate` built from a checkpoint folder, which renders the folder's own
  Jinja template the way transformers does (falling back to :func:`render` when there is none).

Both prepare their inputs as Moonshot's tokenizer does: tools are key-sorted and declared as
a TypeScript-style namespace (:func:`tools_to_typescript`, the template's ``tools_ts_str``),
and, as in transformers 5, message keys whose value is ``None`` are dropped and a message's
reasoning may come as ``reasoning_content``, ``thinking`` or ``reasoning``.

:func:`parse_output` and :class:`StreamParser` split generated text into reasoning, answer
and tool calls, without raising on truncated or malformed output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kimi_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"
EOS = "[EOS]"
THINK = "<think>"
THINK_END = "</think>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"
IMAGE_PLACEHOLDER = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
VIDEO_PLACEHOLDER = "<|kimi_k25_video_placeholder|>"
"""What the template writes for a video part (plain text, not a special token)."""


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings for one mode."""

    temperature: float
    top_p: float


RECOMMENDED_SAMPLING: Mapping[str, SamplingDefaults] = MappingProxyType({
    "thinking": SamplingDefaults(temperature=1.0, top_p=0.95),
    "instant": SamplingDefaults(temperature=0.6, top_p=0.95),
})
"""Moonshot's recommended sampling for each mode."""


# ---------------------------------------------------------------------------------------------
# Tool declarations: JSON schema -> TypeScript-style namespace (Moonshot's tools_ts_str)


class ToolSchemaError(ValueError):
    """A tool's JSON schema uses something the TypeScript-style declaration cannot express."""


_TS_INDENT = "  "


def _comment(text: str, indent: str = "") -> str:
    """``text`` as ``//`` comment lines; empty lines stay empty."""
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


class _Refs:
    """``$defs`` seen so far in one function's schema, and whether it refers to itself (``#``)."""

    def __init__(self) -> None:
        self.definitions: dict[str, Any] = {}
        self.self_ref = False


class _TsType:
    """A parsed schema node: its TypeScript type and the comment lines that precede a field of it."""

    def __init__(self, schema: Mapping[str, Any], constraint_keys: Sequence[str] = ()):
        self.description = schema.get("description", "")
        self.constraints = {k: v for k, v in schema.items() if k in constraint_keys}

    def comments(self, indent: str) -> str:
        lines = []
        if self.description:
            lines.append(_comment(self.description, indent))
        if self.constraints:
            lines.append(f"{indent}// " + ", ".join(f"{k}: {v}" for k, v in sorted(self.constraints.items())))
        return "".join(line + "\n" for line in lines)

    def ts(self, indent: str) -> str:
        raise NotImplementedError


_SCALAR_CONSTRAINTS = {
    "string": ("maxLength", "minLength", "pattern"),
    "number": ("maximum", "minimum"),
    "integer": ("maximum", "minimum"),
}


class _Scalar(_TsType):
    def __init__(self, type_name: str, schema: Mapping[str, Any] = MappingProxyType({})):
        super().__init__(schema, _SCALAR_CONSTRAINTS.get(type_name, ()))
        self.type_name = type_name

    def ts(self, indent: str) -> str:
        return "number" if self.type_name == "integer" else self.type_name


@dataclasses.dataclass
class _Field:
    name: str
    type: _TsType
    optional: bool
    default: Any

    def ts(self, indent: str) -> str:
        out = self.type.comments(indent)
        if self.default is not None:
            shown = (repr(self.default) if isinstance(self.default, (int, float, bool))
                     else json.dumps(self.default, ensure_ascii=False))
            out += f"{indent}// Default: {shown}\n"
        return f"{out}{indent}{self.name}{'?' if self.optional else ''}: {self.type.ts(indent)}"


class _Object(_TsType):
    def __init__(self, schema: Mapping[str, Any], refs: _Refs):
        super().__init__(schema)
        self.fields: list[_Field] = []
        self.extra: _TsType | bool | None = None  # additionalProperties
        if not schema:
            return
        refs.definitions.update(schema.get("$defs") or {})
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            self.extra = _parse_schema(extra, refs)
        elif extra is None or isinstance(extra, bool):
            self.extra = extra
        else:
            raise ToolSchemaError(f"additionalProperties {extra!r} is neither a boolean nor a schema")
        properties, required = schema.get("properties", {}), schema.get("required", [])
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise ToolSchemaError("an object schema needs 'properties' as a mapping and 'required' as a list")
        self.fields = [
            _Field(name, _parse_schema(prop, refs), name not in required,
                   prop.get("default") if isinstance(prop, Mapping) else None)
            for name, prop in properties.items()
        ]

    def ts(self, indent: str) -> str:
        inner = indent + _TS_INDENT
        lines = [f.ts(inner) for f in sorted(self.fields, key=lambda f: (f.optional, f.name))]
        if self.extra is not None:
            extra = {True: "any", False: "never"}[self.extra] if isinstance(self.extra, bool) else self.extra.ts(inner)
            lines.append(f"{inner}[k: string]: {extra}")
        if not lines:
            return "{}"
        return "{\n" + ",\n".join(lines) + f"\n{indent}}}"


class _Array(_TsType):
    def __init__(self, schema: Mapping[str, Any], refs: _Refs):
        super().__init__(schema, ("minItems", "maxItems"))
        self.item = _parse_schema(schema["items"], refs) if schema.get("items") else _Scalar("any")

    def ts(self, indent: str) -> str:
        inner = indent + _TS_INDENT
        item_comments = self.item.comments(inner)
        if item_comments:
            return f"Array<\n{item_comments}{inner}{self.item.ts(inner)}\n{indent}>"
        return f"Array<{self.item.ts(indent)}>"


_ENUM_VALUE_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "number": (int, float), "integer": int, "boolean": bool,
}


class _Enum(_TsType):
    def __init__(self, schema: Mapping[str, Any]):
        super().__init__(schema)
        self.values = list(schema["enum"])
        declared = schema.get("type")
        if isinstance(declared, list):
            if len(declared) == 1:
                declared = declared[0]
            elif len(declared) == 2 and "null" in declared:
                declared = declared[1] if declared[0] == "null" else declared[0]
            else:
                raise ToolSchemaError(f"enum of type {declared!r} is not supported")
        expected = _ENUM_VALUE_TYPES.get(declared) if isinstance(declared, str) else None
        for value in self.values:
            if expected is not None and value is not None and not isinstance(value, expected):
                raise ToolSchemaError(f"enum value {value!r} is not of type {declared}")

    def ts(self, indent: str) -> str:
        return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in self.values)


class _AnyOf(_TsType):
    def __init__(self, schema: Mapping[str, Any], refs: _Refs):
        super().__init__(schema)
        self.options = [_parse_schema(s, refs) for s in schema["anyOf"]]

    def ts(self, indent: str) -> str:
        return " | ".join(o.ts(indent) for o in self.options)


_UNION_MEMBERS = {
    "string": "string", "number": "number", "integer": "number", "boolean": "boolean",
    "null": "null", "object": "{}", "array": "Array<any>",
}


class _Union(_TsType):
    def __init__(self, schema: Mapping[str, Any]):
        super().__init__(schema)
        unknown = [t for t in schema["type"] if t not in _UNION_MEMBERS]
        if unknown:
            raise ToolSchemaError(f"type {unknown[0]!r} in a type list is not supported")
        self.members = [_UNION_MEMBERS[t] for t in schema["type"]]

    def ts(self, indent: str) -> str:
        return " | ".join(self.members)


class _Ref(_TsType):
    def __init__(self, schema: Mapping[str, Any], refs: _Refs):
        super().__init__(schema)
        ref = schema["$ref"]
        if ref == "#":
            refs.self_ref = True
            self.name = "parameters"
        elif ref.startswith("#/$defs/"):
            self.name = ref.split("/")[-1]
            if self.name not in refs.definitions:
                raise ToolSchemaError(f"$ref {ref!r} names no entry of $defs")
        else:
            raise ToolSchemaError(f"$ref {ref!r} is not supported (only '#' and '#/$defs/NAME')")

    def ts(self, indent: str) -> str:
        return self.name


def _parse_schema(schema: Any, refs: _Refs) -> _TsType:
    if isinstance(schema, bool):
        return _Scalar("any" if schema else "null")
    if not isinstance(schema, Mapping):
        raise ToolSchemaError(f"{schema!r} is not a JSON schema")
    if "$ref" in schema:
        return _Ref(schema, refs)
    if "anyOf" in schema:
        return _AnyOf(schema, refs)
    if "enum" in schema:
        return _Enum(schema)
    if "type" in schema:
        kind = schema["type"]
        if isinstance(kind, list):
            return _Union(schema)
        if kind == "object":
            return _Object(schema, refs)
        if kind == "array":
            return _Array(schema, refs)
        return _Scalar(kind, schema)
    if not schema:
        return _Scalar("any")
    raise ToolSchemaError(f"cannot express the JSON schema {schema!r}")


def _function_to_typescript(function: Mapping[str, Any]) -> str:
    refs = _Refs()
    schema = function.get("parameters") or {}
    if not isinstance(schema, Mapping):
        raise ToolSchemaError(f"parameters of tool {function.get('name')!r} are not a JSON schema object")
    params = _Object(schema, refs)
    self_ref = refs.self_ref
    blocks = []
    if self_ref:
        fields = ",\n".join(f.ts(_TS_INDENT) for f in params.fields)
        blocks.append("interface parameters {" + (f"\n{fields}\n" if fields else "") + "}")
    for name, schema in list(refs.definitions.items()):
        if not isinstance(schema, Mapping):
            raise ToolSchemaError(f"$defs entry {name!r} is not a JSON schema object")
        description = schema.get("description", "")
        header = _comment(description) + "\n" if description else ""
        blocks.append(f"{header}interface {name} {_parse_schema(schema, refs).ts('')}")
    if function.get("description"):
        blocks.append(_comment(function["description"]))
    signature = "parameters" if self_ref else params.ts("")
    blocks.append(f"type {function.get('name', 'function')} = (_: {signature}) => any;")
    return "\n".join(blocks)


def _deep_sort(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, recursively."""
    if isinstance(value, Mapping):
        return {k: _deep_sort(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_deep_sort(v) for v in value]
    return value


def tools_to_typescript(tools: Sequence[Mapping[str, Any]] | None) -> str:
    """The TypeScript-style tool declaration Moonshot's tokenizer passes as ``tools_ts_str``.

    ``tools`` are OpenAI-style ``{"type": "function", "function": {name, description,
    parameters}}``; other tool types are skipped, and ``""`` is returned when none is left.
    Raises :class:`ToolSchemaError` for schemas it cannot express.
    """
    return _sorted_tools_to_typescript(_deep_sort(list(tools or [])))


def _sorted_tools_to_typescript(tools: list[Any]) -> str:
    functions = [
        _function_to_typescript(tool["function"])
        for tool in tools
        if tool.get("type") == "function" and tool.get("function")
    ]
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"


def _prepare_tools(tools: Sequence[Mapping[str, Any]] | None) -> tuple[list[Any] | None, str | None]:
    """Key-sorted tools and their TypeScript declaration (``None`` if the schemas cannot be expressed)."""
    if tools is None:
        return None, None
    tools = _deep_sort(list(tools))
    if not tools:
        return tools, None
    try:
        return tools, _sorted_tools_to_typescript(tools)
    except ToolSchemaError as e:
        logger.warning("tools declared as JSON: cannot write them TypeScript-style (%s)", e)
        return tools, None


# ---------------------------------------------------------------------------------------------
# Rendering

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
    media are read by ``kimi_jax.vision.media.conversation_media`` (``kimi_jax.generate``
    does both).

    Reasoning is written only for assistant messages after the last assistant message
    without tool calls (the current tool-using turn), and only in thinking mode; earlier
    assistant turns get an empty ``<think></think>``. The generation prompt opens the
    assistant turn with ``<think>`` (thinking) or ``<think></think>`` (instant).
    """
    messages = _normalize_messages(messages)
    tools, tools_ts = _prepare_tools(tools)
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
        tools, tools_ts = _prepare_tools(tools)
        variables: dict[str, Any] = {
            "messages": _normalize_messages(messages),
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "thinking": thinking,
        }
        if tools_ts is not None:
            variables["tools_ts_str"] = tools_ts
        return self._template.render(**variables, **template_vars)


def encode_chat(
    tokenizer: Tokenizer,
    messages: Iterable[Mapping[str, Any]],
    *,
    template: ChatTemplate | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = True,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the prompt for ``messages`` (built-in renderer unless ``template`` is given)."""
    template = template or ChatTemplate()
    text = template.render(messages, tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, allow_special=True)


# ---------------------------------------------------------------------------------------------
# Output parsing


@dataclasses.dataclass
class ToolCall:
    """One tool call written by the model.

    ``name`` is read from ``id`` (``functions.NAME:INDEX``). ``arguments`` is the parsed JSON
    object of ``raw_arguments``, or ``None`` when that text is not a JSON object. ``error``
    says what was wrong (cut off, missing markers, bad JSON, odd id), or is ``None``.
    """

    id: str
    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str
    error: str | None = None


@dataclasses.dataclass
class ParsedOutput:
    """Model output split into reasoning, answer text and tool calls.

    :meth:`StreamParser.feed` returns one of these holding only what a chunk added.
    """

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation (arguments kept as written)."""
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


def _parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    if not raw.strip():
        return None, "empty arguments"
    try:
        value = json.loads(raw, strict=False)
    except json.JSONDecodeError as e:
        return None, f"arguments are not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"arguments are a JSON {_JSON_TYPE_NAMES[type(value)]}, not an object"
    return value, None


class StreamParser:
    """Incremental :func:`parse_output`: feed decoded text in chunks of any size.

    Markers split across chunks are held back until they are complete. A tool call is
    reported once its ``<|tool_call_end|>`` (or whatever ends it) has arrived. Text between
    the calls of a section, and everything after ``<|im_end|>`` or ``[EOS]``, is ignored.
    """

    def __init__(self, *, thinking: bool = True):
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
        return ParsedOutput("".join(self._reasoning), "".join(self._content), list(self._tool_calls))

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

    def _marker(self, marker: str) -> None:
        state = self._state
        if state == _DONE:
            return
        if marker in (IM_END, EOS):
            if state in (_CALL_ID, _CALL_ARGS):
                self._end_call(closed=False)
            self._state = _DONE
        elif state in (_REASONING, _CONTENT):
            if marker == THINK:
                self._state = _REASONING
            elif marker == THINK_END:
                self._state = _CONTENT
            elif marker == TOOL_CALLS_SECTION_BEGIN:
                self._state = _SECTION
            elif marker == TOOL_CALL_BEGIN:  # a call without its section marker
                self._start_call()
            # stray argument / call-end / section-end markers outside a section are dropped
        elif state == _SECTION:
            if marker == TOOL_CALL_BEGIN:
                self._start_call()
            elif marker == TOOL_CALLS_SECTION_END:
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
            self._state = _CONTENT
        else:  # e.g. "</think>" inside arguments is text
            self._text(marker)

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
        if m := _TOOL_ID_RE.fullmatch(call_id):
            name = m.group(1)
        else:
            name = call_id.removeprefix("functions.")
            errors.append(f"id {call_id!r} is not of the form functions.NAME:INDEX")
        call = ToolCall(call_id, name, arguments, raw, "; ".join(errors) or None)
        self._tool_calls.append(call)
        self._delta.tool_calls.append(call)


def parse_output(
    output: str | Iterable[int], *, tokenizer: Tokenizer | None = None, thinking: bool = True,
) -> ParsedOutput:
    """Split generated output (text, or token ids with ``tokenizer``) into reasoning, answer and tool calls.

    In thinking mode the output starts inside the reasoning (the prompt ended with
    ``<think>``); reasoning ends at ``</think>`` or where a tool-call section begins. In
    instant mode everything outside tool-call sections is answer text. A tool-call section
    is ``<|tool_calls_section_begin|>``, then per call ``<|tool_call_begin|>functions.NAME:IDX``
    ``<|tool_call_argument_begin|>{json}<|tool_call_end|>`` (no space between), then
    ``<|tool_calls_section_end|>``; problems are reported in :attr:`ToolCall.error`, never raised.
    """
    if isinstance(output, str):
        text = output
    elif tokenizer is None:
        raise ValueError("parse_output needs a tokenizer to decode token ids")
    else:
        text = tokenizer.decode(output)
    parser = StreamParser(thinking=thinking)
    parser.feed(text)
    parser.close()
    return parser.result
