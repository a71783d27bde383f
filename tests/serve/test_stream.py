"""Token-level output parsing for the server: the failure modes GPU engines' K2 parsers had."""

import pytest

from kimi_jax.serve.stream import OutputStream


def feed_all(stream: OutputStream, ids):
    deltas = [stream.feed(t) for t in ids] + [stream.close()]
    return deltas


def ids_of(tokenizer, *pieces):
    """Token ids of pieces: ``("special", text)`` encodes special-token strings as special ids,
    a plain string as text (special-token strings in it stay text)."""
    out = []
    for piece in pieces:
        if isinstance(piece, tuple):
            out += tokenizer.encode(piece[1], allow_special=True)
        else:
            out += tokenizer.encode(piece, allow_special=False)
    return out


def test_reasoning_content_and_calls(tokenizer):
    ids = ids_of(
        tokenizer, "let me think", ("s", "</think>"), "Checking.",
        ("s", "<|tool_calls_section_begin|><|tool_call_begin|>"), "functions.get_weather:0",
        ("s", "<|tool_call_argument_begin|>"), '{"city": "Beijing"}',
        ("s", "<|tool_call_end|><|tool_call_begin|>"), "functions.get-time:1",
        ("s", "<|tool_call_argument_begin|>"), "{}", ("s", "<|tool_call_end|><|tool_calls_section_end|><|im_end|>"),
        "after the end",
    )
    stream = OutputStream(tokenizer, thinking=True)
    deltas = feed_all(stream, ids)
    assert stream.reasoning == "let me think" and stream.content == "Checking."
    assert [(c.id, c.name, c.arguments, c.complete) for c in stream.calls] == [
        ("functions.get_weather:0", "get_weather", '{"city": "Beijing"}', True),
        ("functions.get-time:1", "get-time", "{}", True),
    ]
    assert stream.done
    pieces = [c for d in deltas for c in d.calls]
    # the first piece of each call carries its id and name, the rest argument text
    assert [(p.index, p.id, p.name) for p in pieces if p.id] == [
        (0, "functions.get_weather:0", "get_weather"), (1, "functions.get-time:1", "get-time")]
    assert "".join(p.arguments for p in pieces if p.index == 0) == '{"city": "Beijing"}'
    assert "".join(d.reasoning for d in deltas) == "let me think"
    assert "".join(d.content for d in deltas) == "Checking."


def test_literal_special_strings_stay_text(tokenizer):
    """A special-token string the model writes as text (not the special id) is text, in
    arguments and content alike; it neither ends the call nor leaks as a marker."""
    literal = '{"q": "<|tool_call_begin|> and <|im_end|>"}'
    ids = ids_of(tokenizer, ("s", "<|tool_calls_section_begin|><|tool_call_begin|>"), "functions.search:0",
                 ("s", "<|tool_call_argument_begin|>"), literal, ("s", "<|tool_call_end|><|tool_calls_section_end|>"),
                 "see <|im_end|> here", ("s", "<|im_end|>"))
    stream = OutputStream(tokenizer, thinking=False)
    feed_all(stream, ids)
    assert [c.arguments for c in stream.calls] == [literal]
    assert stream.content == "see <|im_end|> here"


def test_odd_ids_and_calls_in_reasoning(tokenizer):
    """An id with a newline keeps its call; a section opened inside the reasoning ends it."""
    ids = ids_of(tokenizer, "hmm", ("s", "<|tool_calls_section_begin|><|tool_call_begin|>"), " functions.a\nb:3 ",
                 ("s", "<|tool_call_argument_begin|>"), '{"x": 1}', ("s", "<|tool_call_end|><|tool_calls_section_end|>"))
    stream = OutputStream(tokenizer, thinking=True)
    feed_all(stream, ids)
    assert stream.reasoning == "hmm" and stream.content == ""
    assert [(c.id, c.name, c.arguments) for c in stream.calls] == [("functions.a\nb:3", "a\nb", '{"x": 1}')]


def test_special_ids_never_reach_text(tokenizer):
    """Reserved and media ids, and stray markers, are dropped; a cut-off call stays incomplete."""
    reserved = tokenizer.special_id("<|media_pad|>")
    ids = ids_of(tokenizer, "a", ("s", "<|tool_call_end|>"), "b", ("s", "<|tool_calls_section_end|>"), "c")
    ids.insert(1, reserved)
    ids += ids_of(tokenizer, ("s", "<|tool_call_begin|>"), "functions.f:0", ("s", "<|tool_call_argument_begin|>"), '{"a')
    stream = OutputStream(tokenizer, thinking=False)
    feed_all(stream, ids)
    assert stream.content == "abc"
    assert [(c.arguments, c.complete) for c in stream.calls] == [('{"a', False)]


def test_multibyte_characters_split_over_tokens(tokenizer):
    text = "naïve 北京 ✓"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # byte-level pieces split the characters
    stream = OutputStream(tokenizer, thinking=False)
    deltas = feed_all(stream, ids)
    assert stream.content == text and all("\ufffd" not in d.content for d in deltas)


@pytest.mark.parametrize("stop", [["STOP"], ["xyz", "OP h"]])
def test_stop_strings_across_tokens(tokenizer, stop):
    ids = tokenizer.encode("hello STOP here")
    stream = OutputStream(tokenizer, thinking=False, stop=stop)
    deltas = feed_all(stream, ids)
    expected = "hello " if stop == ["STOP"] else "hello ST"
    assert stream.content == "".join(d.content for d in deltas) == expected
    assert stream.stopped and stream.done
