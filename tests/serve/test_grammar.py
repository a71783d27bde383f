"""Tool-call grammar masks: every forced call over the Berkeley function-calling schemas is
valid against its schema; tool_choice none / required / named and parallel_tool_calls."""

import gzip
import json

import jsonschema
import numpy as np
import pytest

from kimi_jax.serve.grammar import ToolGrammar, ToolGrammarError
from kimi_jax.serve.stream import OutputStream

BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "String": "string", "Array": "array",
              "ArrayList": "array", "HashMap": "object", "long": "integer", "Boolean": "boolean",
              "double": "number", "char": "string"}
"""BFCL's type names in JSON Schema (``any`` and empty types mean no type)."""

UNSATISFIABLE = {"Events_3_BuyEventTickets", "extract_parameters_v1", "get_response"}
"""BFCL functions whose schemas no JSON satisfies (a required property whose enum values are not of its type)."""


def json_schema(node):
    """A BFCL parameters schema in JSON Schema."""
    if isinstance(node, list):
        return [json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_schema(v) for k, v in node.items() if not (k == "type" and node[k] in ("any", ""))}
    if isinstance(out.get("type"), str):
        out["type"] = BFCL_TYPES.get(out["type"], out["type"])
    return out


def without_descriptions(node):
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


@pytest.fixture(scope="module")
def grammar(tokenizer):
    return ToolGrammar(tokenizer)


def allowed(mask, vocab_size):
    return np.unpackbits(np.asarray(mask).view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


def sample(grammar, constraint, stream, rng, *, limit=3000, ending=None, bias=0.9):
    """Random tokens the constraint allows (mostly ones that close strings and objects, so
    that calls end), fed to ``stream``, until the constraint stops masking, the output ends or ``limit``."""
    ending = ending if ending is not None else grammar_closers(grammar)
    for _ in range(limit):
        mask = constraint.mask()
        if mask is None or stream.done:
            return
        ok = allowed(mask, grammar.vocab_size)
        assert ok.any(), "the mask allows no token"
        pick = ok & ending if rng.random() < bias and (ok & ending).any() else ok
        token = int(rng.choice(np.flatnonzero(pick)))
        constraint.accept(token)
        stream.feed(token)
    raise AssertionError("the call did not end")


def grammar_closers(grammar):
    tok = grammar.tokenizer
    out = np.zeros(grammar.vocab_size, bool)
    for t in range(grammar.vocab_size):
        out[t] = t >= tok.num_base_tokens or tok.decode_bytes([t]) in [bytes([c]) for c in b'"}]0123456789']
    return out


def test_forced_calls_valid_over_bfcl_schemas(grammar, tokenizer, fixtures):
    functions = json.loads(gzip.decompress((fixtures / "bfcl" / "functions.json.gz").read_bytes()))
    assert len(functions) > 3000
    # descriptions do not reach the grammar: one trial per function name and schema less its descriptions
    functions = list({json.dumps([f["name"], without_descriptions(f["parameters"])], sort_keys=True): f
                      for f in functions}.values())
    rng = np.random.default_rng(0)
    closers = grammar_closers(grammar)
    refused = set()
    for fn in functions:
        schema = json_schema(fn["parameters"] or {"type": "object"})
        tools = [{"type": "function", "function": {"name": fn["name"], "parameters": schema}}]
        choice = {"type": "function", "function": {"name": fn["name"]}}
        try:
            constraint = grammar.constraint(tools, choice, thinking=False, parallel=False)
        except ToolGrammarError as e:
            assert "Unsatisfiable" in str(e)
            refused.add(fn["name"])
            continue
        stream = OutputStream(tokenizer, thinking=False)
        sample(grammar, constraint, stream, rng, ending=closers)
        stream.close()
        [call] = stream.calls
        assert call.complete and call.name == fn["name"] and call.id.startswith(f"functions.{fn['name']}:")
        jsonschema.Draft202012Validator(schema).validate(json.loads(call.arguments))  # (no metaschema check)
    assert refused == UNSATISFIABLE


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}, "days": {"type": "integer"}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get-time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def test_none_forbids_sections(grammar, tokenizer):
    constraint = grammar.constraint([WEATHER], "none", thinking=True)
    ok = allowed(constraint.mask(), grammar.vocab_size)
    for marker in ("<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>"):
        assert not ok[tokenizer.special_id(marker)]
    assert ok[tokenizer.im_end_id] and ok[tokenizer.encode("a")[0]]


def test_auto_leaves_text_free_and_constrains_sections(grammar, tokenizer):
    constraint = grammar.constraint([WEATHER, TIME], "auto", thinking=False)
    ok = allowed(constraint.mask(), grammar.vocab_size)
    assert ok[tokenizer.im_end_id] and ok[tokenizer.special_id("<|tool_calls_section_begin|>")]
    assert not ok[tokenizer.special_id("<|tool_call_begin|>")]  # a call only inside a section
    constraint.accept(tokenizer.special_id("<|tool_calls_section_begin|>"))
    ok = allowed(constraint.mask(), grammar.vocab_size)
    assert np.flatnonzero(ok).tolist() == [tokenizer.special_id("<|tool_call_begin|>")]


def test_required_in_thinking_mode(grammar, tokenizer):
    """The reasoning may not end the turn; after </think> the section is forced; with two
    tools and parallel calls allowed, each call is valid."""
    constraint = grammar.constraint([WEATHER, TIME], "required", thinking=True)
    ok = allowed(constraint.mask(), grammar.vocab_size)
    assert not ok[tokenizer.im_end_id] and ok[tokenizer.think_end_id]
    constraint.accept(tokenizer.think_end_id)
    ok = allowed(constraint.mask(), grammar.vocab_size)
    assert np.flatnonzero(ok).tolist() == [tokenizer.special_id("<|tool_calls_section_begin|>")]
    rng = np.random.default_rng(1)
    for trial in range(10):
        constraint = grammar.constraint([WEATHER, TIME], "required", thinking=False)
        stream = OutputStream(tokenizer, thinking=False)
        sample(grammar, constraint, stream, rng, bias=0.7)
        stream.close()
        assert stream.calls
        for call in stream.calls:
            schema = {"get_weather": WEATHER, "get-time": TIME}[call.name]["function"]["parameters"]
            jsonschema.validate(json.loads(call.arguments), schema)


def test_parallel_false_allows_one_call(grammar, tokenizer):
    constraint = grammar.constraint([TIME], "required", thinking=False, parallel=False)
    ids = tokenizer.encode('<|tool_calls_section_begin|><|tool_call_begin|>functions.get-time:0'
                           '<|tool_call_argument_begin|>{"zone": "UTC"}<|tool_call_end|>')
    for t in ids:
        assert allowed(constraint.mask(), grammar.vocab_size)[t], tokenizer.decode([t])
        constraint.accept(t)
    ok = allowed(constraint.mask(), grammar.vocab_size)
    assert np.flatnonzero(ok).tolist() == [tokenizer.special_id("<|tool_calls_section_end|>")]
    constraint.accept(int(np.flatnonzero(ok)[0]))
    ok = allowed(constraint.mask(), grammar.vocab_size)
    assert set(np.flatnonzero(ok).tolist()) == set(tokenizer.stop_ids)  # the turn ends after the section
    constraint.accept(tokenizer.im_end_id)
    assert constraint.mask() is None and constraint.failed is None


@pytest.mark.parametrize("tools, choice, message", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "'nope', which is not among the tools"),
    ([WEATHER], "sometimes", "not auto, none, required"),
    ([{"type": "function", "function": {"parameters": {}}}], "auto", "not a function with a name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["a"],
       "properties": {"a": {"type": "integer", "enum": ["x"]}}}}}], "required", "cannot be compiled"),
])
def test_bad_tools(grammar, tools, choice, message):
    with pytest.raises(ToolGrammarError, match=message):
        grammar.constraint(tools, choice, thinking=False)
