"""Tools an agent can call: :class:`Tool` (an OpenAI-style declaration plus the Python
function behind it), built from a typed, documented callable (:func:`as_tool`) or from an
explicit JSON schema; arguments are checked with ``jsonschema`` before each call
(:meth:`Tool.validate`). Also the built-in :data:`calculator`, which evaluates arithmetic
by walking Python's syntax tree (no ``eval``)."""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import json
import math
import operator
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import docstring_parser
import jsonschema


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool: ``name``, ``description``, ``parameters`` (a JSON schema of an object) and
    ``function``, called with the arguments as keywords. ``tool(**arguments)`` calls it;
    :attr:`schema` is the declaration given to the model."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    function: Callable[..., Any] = dataclasses.field(repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or not self.name.replace("_", "a").replace("-", "a").isalnum():
            raise ValueError(f"tool name {self.name!r} must be letters, digits, '_' or '-'")
        if not callable(self.function):
            raise TypeError(f"tool {self.name!r}: function is a {type(self.function).__name__}, not callable")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema with type 'object'")
        try:
            jsonschema.Draft202012Validator.check_schema(self.parameters)
        except jsonschema.SchemaError as e:
            raise ValueError(f"tool {self.name!r}: parameters are not a valid JSON schema: {e.message}") from None

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI-style declaration (``{"type": "function", "function": {...}}``)."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": dict(self.parameters)}}

    def validate(self, arguments: Any) -> str | None:
        """What is wrong with ``arguments`` for this tool (every problem, one per line), or ``None``."""
        if not isinstance(arguments, Mapping):
            return f"arguments must be a JSON object, got {type(arguments).__name__}"
        problems = sorted(jsonschema.Draft202012Validator(self.parameters).iter_errors(dict(arguments)),
                          key=lambda e: list(e.path))
        if not problems:
            return None
        return "\n".join(f"{'/'.join(map(str, e.path)) or 'arguments'}: {e.message}" for e in problems)

    def __call__(self, **arguments: Any) -> Any:
        return self.function(**arguments)


_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_schema(annotation: Any, where: str) -> dict[str, Any]:
    """The JSON schema of a type hint (str, int, float, bool, list[...], dict[str, ...],
    Literal, Enum, X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    if annotation in (list, tuple):
        return {"type": "array"}
    if annotation is dict:
        return {"type": "object"}
    if origin is typing.Literal:
        kinds = {_SCALARS.get(type(a)) for a in args}
        return {"type": kinds.pop(), "enum": list(args)} if len(kinds) == 1 and None not in kinds else {"enum": list(args)}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _type_schema(typing.Literal[tuple(m.value for m in annotation)], where)
    if origin in (list, tuple) and args:
        return {"type": "array", "items": _type_schema(args[0], where)}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"type": "object", "additionalProperties": _type_schema(args[1], where)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        schemas = [_type_schema(a, where) for a in options]
        if len(args) != len(options):
            schemas.append({"type": "null"})
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    raise TypeError(f"{where}: cannot describe the type {annotation!r} as JSON schema "
                    "(use str, int, float, bool, list, dict, Literal, Enum or X | None)")


def as_tool(function: Callable[..., Any] | Tool | Mapping[str, Any], implementation: Callable[..., Any] | None = None,
            *, name: str | None = None) -> Tool:
    """A :class:`Tool` from a callable, an explicit declaration, or a :class:`Tool` (returned as it is).

    A callable's parameters become the schema's properties (types from the type hints, which
    every parameter needs; those without a default are required) and its docstring the
    descriptions (Google, NumPy or reST style, via ``docstring_parser``). An explicit
    declaration (OpenAI-style ``{"type": "function", "function": {...}}`` or just the inner
    ``{"name", "description", "parameters"}``) needs ``implementation``.
    """
    if isinstance(function, Tool):
        return function
    if isinstance(function, Mapping):
        spec = function.get("function", function) if function.get("type") == "function" else function
        if implementation is None:
            raise ValueError(f"the declaration of tool {spec.get('name')!r} needs the function that implements it")
        if not isinstance(spec.get("name"), str):
            raise ValueError("a tool declaration needs a 'name'")
        return Tool(name or spec["name"], spec.get("description", ""),
                    spec.get("parameters") or {"type": "object", "properties": {}}, implementation)
    if not callable(function):
        raise TypeError(f"a tool is a callable, a declaration or a Tool, got {type(function).__name__}")
    tool_name = name or getattr(function, "__name__", None)
    if not tool_name or tool_name == "<lambda>":
        raise ValueError("give a lambda or unnamed callable a tool name (name=...)")
    doc = docstring_parser.parse(inspect.getdoc(function) or "")
    param_docs = {p.arg_name: p.description for p in doc.params}
    hints = typing.get_type_hints(function)
    properties, required = {}, []
    for p in inspect.signature(function).parameters.values():
        where = f"tool {tool_name!r}, parameter {p.name!r}"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"{where}: only named parameters can be tool arguments")
        if p.name not in hints:
            raise TypeError(f"{where} has no type hint")
        schema = _type_schema(hints[p.name], where)
        if param_docs.get(p.name):
            schema["description"] = param_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        elif p.default is not None:
            schema["default"] = p.default.value if isinstance(p.default, enum.Enum) else p.default
        properties[p.name] = schema
    description = "\n\n".join(d for d in (doc.short_description, doc.long_description) if d)
    return Tool(tool_name, description, {"type": "object", "properties": properties, "required": required}, function)


def result_text(value: Any) -> str:
    """A tool's return value as the text the model reads: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


# ---- the calculator

MAX_EXPRESSION_CHARS = 1000
MAX_INTEGER_DIGITS = 1000

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "exp": math.exp, "log": math.log,
    "log2": math.log2, "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin,
    "acos": math.acos, "atan": math.atan, "floor": math.floor, "ceil": math.ceil, "factorial": math.factorial,
    "gcd": math.gcd,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


class _Unsupported(ValueError):
    """An expression the calculator refuses (not a math error)."""


def _check_size(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_DIGITS * 3.33:
        raise _Unsupported(f"the result has more than {MAX_INTEGER_DIGITS} digits")
    return value


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and right * math.log10(abs(left)) > MAX_INTEGER_DIGITS:
                raise _Unsupported(f"{left} ** {right} has more than {MAX_INTEGER_DIGITS} digits")
        return _check_size(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords):
        args = [_evaluate(a) for a in node.args]
        if node.func.id == "factorial" and args and isinstance(args[0], int) and args[0] > 450:
            raise _Unsupported(f"factorial({args[0]}) has more than {MAX_INTEGER_DIGITS} digits")
        return _check_size(_FUNCTIONS[node.func.id](*args))
    what = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
    raise _Unsupported(f"unsupported in a calculator expression: {what!r} (numbers, + - * / // % **, parentheses, "
                     f"{', '.join(sorted(_CONSTANTS))} and the functions {', '.join(sorted(_FUNCTIONS))})")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, computed by walking its syntax tree (no ``eval``).

    ``ValueError`` naming the problem for anything else (names, attributes, strings), for
    math errors (division by zero, a domain error) and for results past
    :data:`MAX_INTEGER_DIGITS` digits.
    """
    if not isinstance(expression, str):
        raise TypeError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    try:
        return _evaluate(tree)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except (OverflowError, TypeError) as e:
        raise ValueError(str(e)) from None
    except _Unsupported:
        raise
    except ValueError as e:
        raise ValueError(f"math error: {e}") from None


def format_number(value: int | float) -> str:
    """Integers in full; floats with 12 significant digits (``2.0`` -> ``2``, ``1/3`` -> ``0.333333333333``)."""
    return str(value) if isinstance(value, int) else format(value, ".12g")


def _calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Supports numbers, + - * / // % ** (or ^), parentheses, pi, e, tau and the functions abs,
    round, min, max, sqrt, exp, log, log2, log10, sin, cos, tan, asin, acos, atan, floor,
    ceil, factorial and gcd.

    Args:
        expression: The expression to evaluate, e.g. "(17 + 25) * 3 / 7".
    """
    return format_number(calculate(expression))


calculator = as_tool(_calculator, name="calculator")
"""The built-in calculator tool: ``calculator(expression="2 + 3 * 4")`` -> ``"14"``."""
