"""The Jinja sandbox chat templates render in, with resource limits.

A chat template comes with a checkpoint, i.e. from whoever published it. Jinja's
``ImmutableSandboxedEnvironment`` (what transformers uses) keeps it from touching Python
internals, and caps ``range()`` at 100,000 items, but lets it allocate and loop without bound:
``{{ 'a' * 200000000 }}`` builds a 200 MB string, doubling a string with ``~`` in a loop grows
it exponentially, nested loops run for hours. :class:`LimitedSandbox` adds, for each render
(:func:`render_limited`), with the :class:`RenderLimits` in force:

- string results of operators (``*``, ``+``, ``%``, ``~``), string methods, filters and calls
  are capped at ``max_chars`` characters, and lists / tuples at ``max_items`` items; growing
  operations (repetition, ``ljust`` / ``center`` / ``zfill`` widths, ``replace``, ``join``,
  ``%`` and ``format`` widths, ``indent``, ``batch``, ``tojson(indent=...)``, ``lipsum``) are
  checked *before* they allocate; integer ``*`` / ``**`` results are capped at
  :data:`MAX_INT_BITS` bits;
- the output is produced piece by piece (``Template.generate``) and may hold at most
  ``max_chars`` characters;
- ``for`` loops may run at most ``max_loop_iterations`` iterations in all, and the render
  ``timeout_s`` seconds (checked at every loop step, call, operator and output piece);
- too-deep macro recursion is reported instead of raising ``RecursionError``.

A limit that is hit raises :class:`TemplateLimitError` (a ``ValueError``) saying which.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import re
import time
from collections.abc import Iterator
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_INT_BITS = 1 << 16
"""Integer results of ``*`` and ``**`` in templates are capped at this many bits."""


class TemplateLimitError(ValueError):
    """A chat template went past a :class:`RenderLimits` limit."""


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """Resource limits of one chat-template render."""

    max_chars: int = 64 * 2**20
    """Characters of the output, and of any string built while rendering."""
    max_items: int = 1_000_000
    """Items of any list or tuple built while rendering."""
    max_loop_iterations: int = 10_000_000
    """``for``-loop iterations in all."""
    timeout_s: float = 60.0
    """Seconds a render may take."""


class _Budget:
    """What one render has used of its limits."""

    def __init__(self, limits: RenderLimits, timed: bool = True):
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s if timed else None
        self.iterations = 0
        self._ticks = 0

    def tick(self) -> None:
        self._ticks += 1
        if self.deadline is not None and not self._ticks & 255 and time.monotonic() > self.deadline:
            raise TemplateLimitError(f"chat template: rendering took longer than {self.limits.timeout_s:g} s")

    def loop_step(self) -> None:
        self.iterations += 1
        if self.iterations > self.limits.max_loop_iterations:
            raise TemplateLimitError(
                f"chat template: more than {self.limits.max_loop_iterations:,} loop iterations"
            )
        self.tick()

    def chars(self, n: int, what: str = "a string") -> None:
        if n > self.limits.max_chars:
            raise TemplateLimitError(
                f"chat template: {what} of {n:,} characters is over the limit of {self.limits.max_chars:,}"
            )

    def items(self, n: int, what: str = "a list") -> None:
        if n > self.limits.max_items:
            raise TemplateLimitError(
                f"chat template: {what} of {n:,} items is over the limit of {self.limits.max_items:,}"
            )

    def result(self, value: Any) -> Any:
        """``value``, if within the size limits."""
        if isinstance(value, str):
            self.chars(len(value))
        elif isinstance(value, list | tuple):
            self.items(len(value))
        return value


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("kimi_jax_template_budget", default=None)


def _budget() -> _Budget:
    """The budget of the render in progress (outside one, e.g. when Jinja folds constants at
    compile time: the default size limits, no clock)."""
    return _BUDGET.get() or _Budget(RenderLimits(), timed=False)


def _check_int(value: Any, what: str) -> None:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"chat template: {what} is over {MAX_INT_BITS} bits")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)(\{?)")
_DIGITS = re.compile(r"\d+")


def _check_format_widths(fmt: Any, what: str, *, percent: bool) -> None:
    """Widths / precisions in a ``%`` or ``str.format`` format string must fit the limits
    (checked before formatting; ``*`` and nested ``{}`` widths, given as arguments, are refused)."""
    if not isinstance(fmt, str):
        return
    budget = _budget()
    numbers: list[str] = []
    if percent:  # the '%' operator and the format filter
        for width, precision in _PERCENT_SPEC.findall(fmt):
            numbers += [width, precision]
    else:
        for spec, nested in _FORMAT_SPEC.findall(fmt):
            if nested:
                raise TemplateLimitError(f"chat template: {what} with a nested width is not allowed")
            numbers += _DIGITS.findall(spec)
    if "*" in numbers:
        raise TemplateLimitError(f"chat template: {what} with a '*' width is not allowed")
    for number in numbers:
        if number and (len(number) > 12 or int(number) > budget.limits.max_chars):
            budget.chars(int(number), f"a {what} width")


def _seq_len(value: Any) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


def _check_growth(name: str, obj: Any, args: tuple, kwargs: dict) -> None:
    """Check, before it runs, a string method that can return more than its inputs."""
    budget = _budget()
    if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        budget.chars(args[0], f"str.{name} width")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = obj.count(args[0]) if args[0] else len(obj) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            count = min(count, args[2])
        budget.chars(len(obj) + count * len(args[1]), "the result of str.replace")
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], list | tuple) else None
        if items is not None:
            budget.chars(sum(len(x) for x in items if isinstance(x, str)) + len(obj) * max(len(items) - 1, 0),
                         "the result of str.join")
    elif name == "expandtabs":
        size = args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            budget.chars(len(obj) + obj.count("\t") * max(size, 0), "the result of str.expandtabs")
    elif name in ("format", "format_map"):
        _check_format_widths(obj, "str.format", percent=False)


def _guard_filter(name: str, func: Any) -> Any:
    """``func`` checked before it runs (filters that can grow their input) and after (the size of its result)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature: result size checked only
        signature = None

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        if name in _GROWING_FILTERS and signature is not None:
            try:
                bound = signature.bind(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            _GROWING_FILTERS[name](budget, bound)
        return budget.result(func(*args, **kwargs))

    return guarded


def _check_width_filter(budget: _Budget, a: dict) -> None:
    width = a.get("width")
    if isinstance(width, int):
        budget.chars(width, "a filter width")


def _check_indent_filter(budget: _Budget, a: dict) -> None:
    s, width = a.get("s"), a.get("width", 4)
    if isinstance(s, str):
        per_line = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
        budget.chars(len(s) + (s.count("\n") + 1) * max(per_line, 0), "the result of indent")


def _check_replace_filter(budget: _Budget, a: dict) -> None:
    s, old, new = a.get("s"), a.get("old"), a.get("new")
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        _check_growth("replace", s, (old, new), {})


def _check_batch_filter(budget: _Budget, a: dict) -> None:
    count = a.get("linecount")
    if isinstance(count, int):
        budget.items(count, "a batch")


def _check_format_filter(budget: _Budget, a: dict) -> None:
    _check_format_widths(a.get("value"), "format", percent=True)


def _check_tojson_filter(budget: _Budget, a: dict) -> None:
    indent = a.get("indent")
    if isinstance(indent, int) and indent > 64:
        raise TemplateLimitError(f"chat template: tojson indent {indent} is over 64")


_GROWING_FILTERS = {
    "center": _check_width_filter,
    "indent": _check_indent_filter,
    "replace": _check_replace_filter,
    "batch": _check_batch_filter,
    "format": _check_format_filter,
    "tojson": _check_tojson_filter,
}


def _loop_guard(iterable: Any) -> Iterator[Any]:
    """What every ``for`` loop of a template iterates: counts the iterations against the budget."""
    budget = _budget()
    budget.tick()
    if isinstance(iterable, jinja2.Undefined):
        iterable = ()
    for item in iterable:
        budget.loop_step()
        yield item


def _guarded_concat(values: list[Any]) -> str:
    """``a ~ b ~ ...``: Jinja's string concatenation, size-checked before joining."""
    strings = [str(v) for v in values]
    _budget().chars(sum(len(s) for s in strings), "a '~' concatenation")
    return "".join(strings)


_LOOP_GUARD = "__kimi_jax_loop_guard"
_CONCAT = "__kimi_jax_concat"


class _Instrument(NodeTransformer):
    """Route every ``for`` loop's iterable through the loop guard and every ``~`` through the
    size-checked concatenation."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_GUARD, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT, [], [], None, None,
                            lineno=node.lineno)


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` with the size, loop and time limits of the module docstring."""

    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.filters[_LOOP_GUARD] = _loop_guard
        self.filters[_CONCAT] = _guarded_concat
        self.globals["lipsum"] = _lipsum

    def add_filter(self, name: str, func: Any) -> None:
        """Register a filter, size-checked like the built-in ones."""
        self.filters[name] = _guard_filter(name, func)

    def guard_filters(self) -> None:
        """Wrap every filter registered so far (call after adding filters directly)."""
        for name, func in list(self.filters.items()):
            if name not in (_LOOP_GUARD, _CONCAT) and not getattr(func, "_kimi_jax_guarded", False):
                guarded = _guard_filter(name, func)
                guarded._kimi_jax_guarded = True
                self.filters[name] = guarded

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Instrument().visit(super()._parse(source, name, filename))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                size = _seq_len(seq)
                if size is not None and isinstance(n, int):
                    if isinstance(seq, str):
                        budget.chars(size * max(n, 0), "a repeated string")
                    else:
                        budget.items(size * max(n, 0), "a repeated list")
            if isinstance(left, int) and isinstance(right, int) and (
                left.bit_length() + right.bit_length() > MAX_INT_BITS + 1
            ):
                raise TemplateLimitError(f"chat template: a product is over {MAX_INT_BITS} bits")
        elif operator == "+":
            if isinstance(left, str) and isinstance(right, str):
                budget.chars(len(left) + len(right), "a '+' concatenation")
            elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
                budget.items(len(left) + len(right), "a '+' concatenation")
        elif operator == "%":
            _check_format_widths(left, "'%' format", percent=True)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if left.bit_length() * min(right, MAX_INT_BITS + 1) > MAX_INT_BITS:
                    raise TemplateLimitError(f"chat template: a power is over {MAX_INT_BITS} bits")
        result = super().call_binop(context, operator, left, right)
        _check_int(result, "a number")
        return budget.result(result)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget()
        budget.tick()
        target = getattr(__obj, "__wrapped__", __obj)
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _check_growth(getattr(target, "__name__", ""), owner, args, kwargs)
        return budget.result(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().tick()
        return super().getitem(obj, argument)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    if not (isinstance(n, int) and isinstance(max, int)) or n * max > 100_000:
        raise TemplateLimitError("chat template: lipsum asked for more than 100,000 words")
    from jinja2.utils import generate_lorem_ipsum

    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def new_environment(**options: Any) -> LimitedSandbox:
    """A :class:`LimitedSandbox` with Jinja's loop controls (``break`` / ``continue``)."""
    options.setdefault("extensions", [jinja2.ext.loopcontrols])
    return LimitedSandbox(**options)


def render_limited(template: jinja2.Template, variables: dict[str, Any], limits: RenderLimits) -> str:
    """Render ``template`` piece by piece within ``limits``; :class:`TemplateLimitError` past one."""
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    try:
        pieces: list[str] = []
        size = 0
        for piece in template.generate(**variables):
            size += len(piece)
            budget.chars(size, "the rendered prompt")
            budget.tick()
            pieces.append(piece)
        return "".join(pieces)
    except RecursionError:
        raise TemplateLimitError("chat template: recursion too deep (a macro calling itself?)") from None
    finally:
        _BUDGET.reset(token)
