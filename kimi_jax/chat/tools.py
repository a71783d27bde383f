"""Tool declarations: OpenAI-style tools (JSON schema) to the TypeScript-style namespace
Moonshot's tokenizer writes into K2.5's prompt (the chat template's ``tools_ts_str``)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from kimi_jax.chat.validate import standard_json

logger = logging.getLogger(__name__)


class ToolSchemaError(ValueError):
    """A tool's JSON schema uses something the TypeScript-style declaration cannot express,
    or the tools are not declarable at all (nested deeper than
    :data:`~kimi_jax.chat.validate.MAX_JSON_DEPTH` levels, NaN / Infinity, values JSON cannot hold)."""


def check_tools(tools: Any) -> None:
    """:class:`ToolSchemaError` unless ``tools`` is a list of mappings that is standard JSON
    nested at most :data:`~kimi_jax.chat.validate.MAX_JSON_DEPTH` deep (checked without recursion)."""
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise ToolSchemaError(f"tools must be a list of tool mappings, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ToolSchemaError(f"tool {i} is a {type(tool).__name__}, not a mapping")
    try:
        standard_json(list(tools), "tools")
    except ValueError as e:
        raise ToolSchemaError(f"cannot declare the {e}") from None


def tools_json(tools: Sequence[Mapping[str, Any]]) -> str:
    """The compact JSON declaration the template writes when there is no TypeScript one."""
    return json.dumps(list(tools), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


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
    Raises :class:`ToolSchemaError` for schemas it cannot express, and for tools that are not
    standard JSON or nest too deep (:func:`check_tools`).
    """
    tools = list(tools or [])
    check_tools(tools)
    return _sorted_tools_to_typescript(_deep_sort(tools))


def _sorted_tools_to_typescript(tools: list[Any]) -> str:
    functions = [
        _function_to_typescript(tool["function"])
        for tool in tools
        if tool.get("type") == "function" and tool.get("function")
    ]
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"


def prepare_tools(tools: Sequence[Mapping[str, Any]] | None) -> tuple[list[Any] | None, str | None]:
    """Key-sorted tools and their TypeScript declaration (``None`` if the schemas cannot be
    expressed: the template then declares them as JSON).

    :class:`ToolSchemaError` if the tools cannot be declared at all (:func:`check_tools`).
    """
    if tools is None:
        return None, None
    check_tools(tools)
    tools = _deep_sort(list(tools))
    if not tools:
        return tools, None
    try:
        return tools, _sorted_tools_to_typescript(tools)
    except ToolSchemaError as e:
        logger.warning("tools declared as JSON: cannot write them TypeScript-style (%s)", e)
        return tools, None
