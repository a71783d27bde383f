"""Chat rendering against the reference apply_chat_template (golden chat_cases), and output parsing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from kimi_jax.chat.parser import ParsedOutput, StreamParser, ToolCall, parse_output
from kimi_jax.chat.template import ChatTemplate, render
from kimi_jax.chat.tokenizer import Tokenizer, special_tokens_from_config
from kimi_jax.chat.tools import tools_to_typescript
from kimi_jax.config.model import builtin_config_dir
from kimi_jax.inference.sampling import RECOMMENDED_SAMPLING

FIX = Path(__file__).parents[1] / "fixtures" / "chat"
CASES = json.loads((FIX / "chat_cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def jinja() -> ChatTemplate:
    template = ChatTemplate.from_dir(builtin_config_dir())
    assert not template.is_builtin
    return template


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Byte-level ranks only, with the real special tokens moved to start at 256."""
    config = json.loads((builtin_config_dir() / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(int(k) - 163584 + 256): v for k, v in config["added_tokens_decoder"].items()}
    return Tokenizer({bytes([i]): i for i in range(256)}, special_tokens_from_config(config, 256))


# ---- rendering


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_cases(case, jinja):
    messages = copy.deepcopy(case["messages"])
    assert render(messages, **case["kwargs"]) == case["rendered"]
    assert jinja.render(messages, **case["kwargs"]) == case["rendered"]
    assert messages == case["messages"]  # inputs are not modified
    if "tools" in case["kwargs"]:
        assert tools_to_typescript(case["kwargs"]["tools"]) == case["tools_ts_str"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
UNEXPRESSIBLE = {"type": "function", "function": {
    "name": "odd", "parameters": {"type": "object", "properties": {"x": {"$ref": "http://elsewhere"}}}}}

MORE_CONVERSATIONS = [
    # None values are dropped; reasoning may come as "reasoning"; non-ASCII dict arguments
    ([{"role": "user", "content": "hi", "name": None},
      {"role": "assistant", "content": None, "reasoning": "think",
       "tool_calls": [{"id": "functions.get_weather:0", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
      {"role": "tool", "name": "get_weather", "tool_call_id": "functions.get_weather:0", "content": None}],
     {"tools": [WEATHER]}),
    # media parts in every position, a part without text, a custom role
    ([{"role": "developer", "content": "rules"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "video"},
                                   {"type": "image_url", "image_url": {"url": "u"}}, {"type": "text"}]}],
     {}),
    # reasoning of the current turn dropped in instant mode; history reasoning dropped
    ([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "old"},
      {"role": "user", "content": "q2"},
      {"role": "assistant", "content": "", "reasoning_content": "new",
       "tool_calls": [{"id": "functions.get_weather:0", "function": {"name": "get_weather", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
      {"role": "assistant", "content": "done", "reasoning_content": "final"}],
     {"thinking": False, "add_generation_prompt": False}),
    # a schema the TypeScript writer cannot express: tools declared as compact JSON
    ([{"role": "user", "content": "x"}], {"tools": [WEATHER, UNEXPRESSIBLE]}),
    # only non-function tools: no TypeScript declaration, JSON instead
    ([{"role": "user", "content": "x"}], {"tools": [{"type": "_plugin", "_plugin": {"name": "web"}}]}),
    ([], {"tools": []}),
    ([], {"add_generation_prompt": False}),
]


@pytest.mark.parametrize("messages,kwargs", MORE_CONVERSATIONS)
def test_renderers_agree(messages, kwargs, jinja):
    assert render(messages, **kwargs) == jinja.render(messages, **kwargs)


def test_render_details():
    text = render(*MORE_CONVERSATIONS[0][:1], tools=[WEATHER])
    assert '<|tool_call_argument_begin|>{"city": "Zürich"}<|tool_call_end|>' in text
    assert "<think>think</think><|tool_calls_section_begin|>" in text
    assert "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n<|im_end|>" in text
    media = render(MORE_CONVERSATIONS[1][0])
    assert ("<|im_user|>user<|im_middle|>a<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"
            "<|kimi_k25_video_placeholder|>\n") in media
    history = render(MORE_CONVERSATIONS[2][0], thinking=False, add_generation_prompt=False)
    assert "old" not in history and "new" not in history and "final" not in history
    fallback = render(*MORE_CONVERSATIONS[3][:1], tools=[WEATHER, UNEXPRESSIBLE])
    assert fallback.startswith('<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"Weather.",')
    assert render([], tools=[]) == render([]) == "<|im_assistant|>assistant<|im_middle|><think>"


def test_template_from_dir(tmp_path):
    assert ChatTemplate.from_dir(tmp_path).is_builtin
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}!"}))
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "hey"}]) == "hey!"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "{{ x }}"}]}))
    assert ChatTemplate.from_dir(tmp_path).render([], x="extra variable") == "extra variable"
    (tmp_path / "chat_template.jinja").write_text("{{ tools | tojson }}{{ raise_exception('boom') if not thinking }}")
    template = ChatTemplate.from_dir(tmp_path)
    assert template.render([], tools=[{"b": 1, "a": "é"}]) == '[{"a": "é", "b": 1}]'
    with pytest.raises(Exception, match="boom"):
        template.render([], thinking=False)
    with pytest.raises(TypeError, match="no template variables"):
        ChatTemplate().render([], x=1)


def test_encode_chat(tok, jinja):
    messages = CASES[0]["messages"]
    ids = tok.encode_chat(messages)
    assert ids == tok.encode_chat(messages, template=jinja)
    assert tok.decode(ids) == CASES[0]["rendered"]
    assert ids[:1] == [tok.im_system_id] and ids[-1] == tok.think_id
    assert ids.count(tok.im_middle_id) == 3


def test_sampling_defaults():
    assert (RECOMMENDED_SAMPLING["thinking"].temperature, RECOMMENDED_SAMPLING["thinking"].top_p) == (1.0, 0.95)
    assert (RECOMMENDED_SAMPLING["instant"].temperature, RECOMMENDED_SAMPLING["instant"].top_p) == (0.6, 0.95)


# ---- output parsing

SECTION = "<|tool_calls_section_begin|>"
CALL = "<|tool_call_begin|>"
ARGS = "<|tool_call_argument_begin|>"
END = "<|tool_call_end|>"
SECTION_END = "<|tool_calls_section_end|>"

TWO_CALLS = (
    "Need both cities; the tag </think> is not here yet."
    f"{SECTION}{CALL}functions.get_weather:0{ARGS}{{\"city\": \"Paris\"}}{END}"
    f"\n{CALL} functions.web.search:1 {ARGS} {{\"q\": \"a </think> b\", \"n\": [1, 2]}} {END}{SECTION_END}<|im_end|>"
)


def test_thinking_and_instant():
    out = parse_output("2 plus 2.</think>It is 4.<|im_end|>ignored")
    assert (out.reasoning, out.content, out.tool_calls) == ("2 plus 2.", "It is 4.", [])
    out = parse_output("<think>r</think>\n\nanswer[EOS]")
    assert (out.reasoning, out.content) == ("r", "\n\nanswer")
    assert parse_output("Hello!<|im_end|>", thinking=False) == ParsedOutput("", "Hello!", [])
    assert parse_output("still thinking when cut off") == ParsedOutput("still thinking when cut off", "", [])


def test_multiple_calls():
    out = parse_output(TWO_CALLS)
    assert out.reasoning == "Need both cities; the tag "
    assert out.content == " is not here yet."
    assert out.tool_calls == [
        ToolCall("functions.get_weather:0", "get_weather", {"city": "Paris"}, '{"city": "Paris"}'),
        ToolCall("functions.web.search:1", "web.search", {"q": "a </think> b", "n": [1, 2]},
                 ' {"q": "a </think> b", "n": [1, 2]} '),
    ]


def test_reasoning_ends_at_tool_section():
    out = parse_output(f"plan{SECTION}{CALL}functions.f:0{ARGS}{{}}{END}{SECTION_END}<|im_end|>")
    assert (out.reasoning, out.content) == ("plan", "")
    assert out.tool_calls == [ToolCall("functions.f:0", "f", {}, "{}")]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 29, 1000])
def test_streaming_matches_whole(size):
    whole = parse_output(TWO_CALLS)
    parser = StreamParser()
    deltas = [parser.feed(TWO_CALLS[i:i + size]) for i in range(0, len(TWO_CALLS), size)]
    deltas.append(parser.close())
    assert parser.result == whole
    assert "".join(d.reasoning for d in deltas) == whole.reasoning
    assert "".join(d.content for d in deltas) == whole.content
    assert [c for d in deltas for c in d.tool_calls] == whole.tool_calls
    assert not any("<" in d.reasoning or "<" in d.content for d in deltas)  # no partial markers leak
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_stream_reports_calls_as_they_close():
    parser = StreamParser(thinking=False)
    assert parser.feed(f"ok{SECTION}{CALL}functions.f:0{ARGS}{{\"a\"") == ParsedOutput("", "ok", [])
    delta = parser.feed(": 1}<|tool_call_e")
    assert delta.tool_calls == []
    delta = parser.feed(f"nd|>{SECTION_END}")
    assert delta.tool_calls == [ToolCall("functions.f:0", "f", {"a": 1}, '{"a": 1}')]


@pytest.mark.parametrize("output,expected", [
    # cut off inside the arguments
    (f"r{SECTION}{CALL}functions.f:0{ARGS}{{\"a\": 1",
     ToolCall("functions.f:0", "f", None, '{"a": 1', "cut off before <|tool_call_end|>; arguments are not valid JSON")),
    # cut off inside the end marker: the partial marker is argument text
    (f"r{SECTION}{CALL}functions.f:0{ARGS}{{\"a\": 1}}<|tool_call_e",
     ToolCall("functions.f:0", "f", None, '{"a": 1}<|tool_call_e', "cut off before <|tool_call_end|>; arguments are not valid JSON")),
    # complete JSON, but the end marker never came
    (f"r{SECTION}{CALL}functions.f:0{ARGS}{{\"a\": 1}}",
     ToolCall("functions.f:0", "f", {"a": 1}, '{"a": 1}', "cut off before <|tool_call_end|>")),
    # cut off in the id
    (f"r{SECTION}{CALL}functions.f",
     ToolCall("functions.f", "f", None, "", "cut off before <|tool_call_end|>; no <|tool_call_argument_begin|>; id")),
    # stopped by <|im_end|> inside a call
    (f"r{SECTION}{CALL}functions.f:0{ARGS}{{}}<|im_end|>",
     ToolCall("functions.f:0", "f", {}, "{}", "cut off before <|tool_call_end|>")),
])
def test_cut_off_calls(output, expected):
    (call,) = parse_output(output).tool_calls
    assert (call.id, call.name, call.arguments, call.raw_arguments) == (
        expected.id, expected.name, expected.arguments, expected.raw_arguments)
    assert call.error.startswith(expected.error)


@pytest.mark.parametrize("body,error", [
    (f"functions.f:0{ARGS}{{'a': 1}}", "arguments are not valid JSON"),
    (f"functions.f:0{ARGS}[1, 2]", "arguments are a JSON array, not an object"),
    (f"functions.f:0{ARGS}", "empty arguments"),
    ("functions.f:0", "no <|tool_call_argument_begin|>"),
    (f"get_weather{ARGS}{{}}", "id 'get_weather' is not of the form functions.NAME:INDEX"),
])
def test_malformed_calls(body, error):
    out = parse_output(f"{SECTION}{CALL}{body}{END}{CALL}functions.g:1{ARGS}{{\"ok\": true}}{END}{SECTION_END}")
    bad, good = out.tool_calls
    assert bad.error.startswith(error)
    assert bad.arguments is None or bad.error.startswith("id")
    assert good == ToolCall("functions.g:1", "g", {"ok": True}, '{"ok": true}')


def test_call_without_section_marker_and_unclosed_section():
    out = parse_output(f"r</think>text{CALL}functions.f:0{ARGS}{{}}{END}")
    assert out.content == "text" and out.tool_calls == [ToolCall("functions.f:0", "f", {}, "{}")]
    out = parse_output(f"{SECTION}{CALL}functions.f:0{ARGS}{{}}{CALL}functions.g:1{ARGS}{{}}{END}", thinking=False)
    assert [c.error for c in out.tool_calls] == ["cut off before <|tool_call_end|>", None]


def test_parse_ids(tok):
    text = f"why</think>because{SECTION}{CALL}functions.f:0{ARGS}{{\"x\": \"你好\"}}{END}{SECTION_END}<|im_end|>"
    ids = tok.encode(text)
    assert parse_output(ids, tokenizer=tok) == parse_output(text)
    with pytest.raises(ValueError, match="tokenizer"):
        parse_output(ids)


@pytest.mark.parametrize("case", [c for c in CASES if any(m["role"] == "assistant" for m in c["messages"])],
                         ids=lambda c: c["name"])
def test_parsed_output_renders_back(case):
    """Rendering an assistant turn, parsing it back and rendering the result gives the same prompt."""
    messages, kwargs = case["messages"], {k: v for k, v in case["kwargs"].items() if k != "add_generation_prompt"}
    i = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = render(messages[:i], **kwargs)
    full = render(messages[:i + 1], **kwargs, add_generation_prompt=False)
    assert full.startswith(prompt.removesuffix("<think>").removesuffix("<think></think>"))
    output = full[len(prompt):]
    message = parse_output(output, thinking=kwargs.get("thinking", True)).to_message()
    assert render([*messages[:i], message], **kwargs, add_generation_prompt=False) == full
