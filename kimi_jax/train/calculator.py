"""The ``calculator`` recipe's data: arithmetic and unit-conversion questions answered through
the ``calculator`` tool (one string argument ``expression``) in the K2.5 chat format.

Each conversation is a user question, an assistant turn calling the tool (Thinking mode
with a line of reasoning, or Instant mode without), the tool's result (``## Return of ...``)
and the assistant's answer built from it. The generator knows every answer
(:func:`evaluate`), so it also scores a model (:func:`accuracy`): the model's own tool call
is executed and its final answer must contain the right number.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import operator
import random
from collections.abc import Sequence
from typing import Any

TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}},
            "required": ["expression"],
        },
    },
}]
CALL_ID = "functions.calculator:0"


def tool():
    """The agents' built-in ``calculator`` (``kimi_jax.agents.calculator``) under the shorter
    declaration of :data:`TOOLS` that the recipe's model was trained with."""
    from kimi_jax.agents import calculator
    from kimi_jax.agents.tools import Tool

    declaration = TOOLS[0]["function"]
    return Tool(declaration["name"], declaration["description"], declaration["parameters"], calculator.function)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
UNITS = (  # from, to, operator, factor
    ("kilometers", "meters", "*", 1000), ("meters", "centimeters", "*", 100), ("kilograms", "grams", "*", 1000),
    ("hours", "minutes", "*", 60), ("minutes", "seconds", "*", 60), ("days", "hours", "*", 24),
    ("feet", "inches", "*", 12), ("inches", "centimeters", "*", 2.54), ("liters", "milliliters", "*", 1000),
    ("miles", "kilometers", "*", 1.609), ("meters", "kilometers", "/", 1000), ("grams", "kilograms", "/", 1000),
    ("minutes", "hours", "/", 60), ("centimeters", "meters", "/", 100),
)


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression of numbers, ``+ - * /`` and parentheses;
    ``ValueError`` for anything else (names, calls, other operators) or a division by zero."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            try:
                return _OPS[type(node.op)](value(node.left), value(node.right))
            except ZeroDivisionError:
                raise ValueError(f"division by zero in {expression!r}") from None
        raise ValueError(f"only numbers, + - * / and parentheses are allowed: {expression!r}")

    return value(tree.body)


def format_number(x: float) -> str:
    """``x`` as the calculator prints it: integers without a decimal point, others rounded to 6 decimals."""
    x = round(float(x), 6)
    return str(int(x)) if x == int(x) else f"{x:.6f}".rstrip("0")


@dataclasses.dataclass(frozen=True)
class Question:
    text: str
    expression: str
    answer: str  # the result as the calculator prints it
    reply: str  # the final answer, "{...}" holding the result's place


def _number(rng: random.Random) -> str:
    return str(rng.randint(1, 99)) if rng.random() < 0.7 else f"{rng.randint(1, 99)}.{rng.randint(1, 9)}"


def make_question(rng: random.Random) -> Question:
    """A random arithmetic (two thirds) or unit-conversion question."""
    if rng.random() < 2 / 3:
        op = rng.choice("+-*/")
        if op in "+-":
            a, b = rng.randint(2, 999), rng.randint(2, 999)
        elif op == "*":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
        else:
            b = rng.randint(2, 30)
            a = b * rng.randint(2, 40)
        expr = f"{a} {op} {b}"
        word = _SYMBOLS[op]
        text = rng.choice([
            f"What is {a} {op} {b}?", f"Calculate {a} {op} {b}.", f"How much is {a} {word} {b}?",
            f"What is {a} {word} {b}?", f"Compute {a} {op} {b}", f"what's {a}{op}{b}?",
        ])
        reply = rng.choice([f"{expr} = {{}}.", "The answer is {}.", f"{a} {word} {b} is {{}}."])
    else:
        src, dst, op, factor = rng.choice(UNITS)
        x = _number(rng)
        expr = f"{x} {op} {factor}"
        text = rng.choice([
            f"How many {dst} are in {x} {src}?", f"Convert {x} {src} to {dst}.", f"What is {x} {src} in {dst}?",
        ])
        reply = f"{x} {src} is {{}} {dst}."
    return Question(text, expr, format_number(evaluate(expr)), reply)


def conversation(q: Question, *, thinking: bool, result: str | None = None) -> list[dict[str, Any]]:
    """The whole exchange for ``q``: question, tool call, tool result (``result``, default
    the right one) and answer; reasoning only in Thinking mode."""
    result = q.answer if result is None else result
    call = {"id": CALL_ID, "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": q.expression})}}
    first: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [call]}
    last: dict[str, Any] = {"role": "assistant", "content": q.reply.format(result)}
    if thinking:
        first["reasoning_content"] = f"The user wants {q.expression}. I will use the calculator."
        last["reasoning_content"] = f"The calculator returned {result}."
    return [{"role": "user", "content": q.text}, first,
            {"role": "tool", "tool_call_id": CALL_ID, "content": result}, last]


def held_out(n: int = 200, seed: int = 10_000) -> list[Question]:
    """``n`` distinct questions for evaluation; :func:`training_questions` never yields them."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        q = make_question(rng)
        if q.text not in seen:
            seen.add(q.text)
            out.append(q)
    return out


def training_questions(rng: random.Random, n: int, exclude: set[str]) -> list[Question]:
    out = []
    while len(out) < n:
        q = make_question(rng)
        if q.text not in exclude:
            out.append(q)
    return out


def accuracy(model, tokenizer, questions: Sequence[Question], *, thinking: bool, max_new_tokens: int = 192,
             engine=None) -> tuple[float, list[dict]]:
    """The share of ``questions`` answered right with the tool, greedy: the model's tool
    call is parsed and executed with :func:`evaluate`, its result given back, and the final
    answer must contain the right number. Returns (accuracy, one record per question)."""
    import kimi_jax

    mode = "thinking" if thinking else "instant"
    chats = [[{"role": "user", "content": q.text}] for q in questions]
    first = kimi_jax.generate(model, chats, tokenizer=tokenizer, tools=TOOLS, mode=mode, temperature=0.0,
                              max_new_tokens=max_new_tokens, engine=engine)
    records, follow = [], []
    for q, chat, reply in zip(questions, chats, first, strict=True):
        record = {"question": q.text, "expected": q.answer, "expression": None, "result": None, "answer": None}
        calls = reply.parsed.tool_calls
        if calls and calls[0].name == "calculator":
            try:
                if calls[0].error:
                    raise ValueError(calls[0].error)
                expression = calls[0].arguments["expression"]
                record["expression"] = expression
                record["result"] = format_number(evaluate(str(expression)))
            except (ValueError, KeyError) as e:
                record["result"] = f"error: {e}"
            message = reply.parsed.to_message()
            if not thinking:
                message.pop("reasoning_content", None)
            follow.append((record, [*chat, message, {"role": "tool", "tool_call_id": calls[0].id,
                                                     "content": record["result"]}]))
        records.append(record)
    if follow:
        second = kimi_jax.generate(model, [c for _, c in follow], tokenizer=tokenizer, tools=TOOLS, mode=mode,
                                   temperature=0.0, max_new_tokens=max_new_tokens, engine=engine)
        for (record, _), reply in zip(follow, second, strict=True):
            record["answer"] = reply.parsed.content
    for r in records:
        r["correct"] = bool(r["answer"]) and _contains_number(r["answer"], r["expected"])
    return sum(r["correct"] for r in records) / max(len(records), 1), records


def _contains_number(text: str, number: str) -> bool:
    """Whether ``number`` appears in ``text`` as a whole number (not inside a longer one)."""
    import re

    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])(?!\.\d)", text) is not None
