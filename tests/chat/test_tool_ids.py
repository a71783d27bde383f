"""Tool-call ids: foreign ids in histories render as K2.5's ``functions.NAME:INDEX`` and map
back to the client's; calls the model writes with foreign ids are named from the declared
tools, whole and streamed; a tool-call section without calls is a warning."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest

from kimi_jax.chat.parser import ParsedOutput, StreamParser, ToolCall, parse_output
from kimi_jax.chat.template import ChatTemplate, render
from kimi_jax.chat.tokenizer import Tokenizer, special_tokens_from_config
from kimi_jax.chat.tool_ids import (
    DeclaredTool,
    ToolIdMap,
    declared_tools,
    is_canonical_id,
    normalize_tool_ids,
)
from kimi_jax.config.model import builtin_config_dir

FIX = Path(__file__).parents[1] / "fixtures" / "chat"
CASES = json.loads((FIX / "chat_cases.json").read_text())["cases"]

SECTION = "<|tool_calls_section_begin|>"
CALL = "<|tool_call_begin|>"
ARGS = "<|tool_call_argument_begin|>"
END = "<|tool_call_end|>"
SECTION_END = "<|tool_calls_section_end|>"


def tool(name: str, properties: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": f"{name}.",
        "parameters": {"type": "object", "properties": {p: {"type": "string"} for p in properties},
                       "required": list(required)}}}


WEATHER = tool("get_weather", ("city", "unit"), ("city",))
SEARCH = tool("web_search", ("query", "top_k"), ("query",))
TIME = tool("get_time", ("timezone",))
FORECAST = tool("get_forecast", ("city", "days"), ("city",))


@pytest.fixture(scope="module")
def jinja() -> ChatTemplate:
    return ChatTemplate.from_dir(builtin_config_dir())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Byte-level ranks only, with the real special tokens moved to start at 256."""
    config = json.loads((builtin_config_dir() / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(int(k) - 163584 + 256): v for k, v in config["added_tokens_decoder"].items()}
    return Tokenizer({bytes([i]): i for i in range(256)}, special_tokens_from_config(config, 256))


# ---- histories: foreign ids render as functions.NAME:INDEX and map back


def conversation(ids: list[list[str]]) -> list[dict]:
    """Two tool-using turns: two weather calls, then (after an answer) one search; ``ids``
    are the calls' ids per assistant message."""
    (paris, tokyo), (search,) = ids
    return [
        {"role": "system", "content": "You are Kimi."},
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {"role": "assistant", "content": "", "reasoning_content": "Both cities.", "tool_calls": [
            {"id": paris, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": tokyo, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
        ]},
        {"role": "tool", "tool_call_id": paris, "name": "get_weather", "content": "18C"},
        {"role": "tool", "tool_call_id": tokyo, "name": "get_weather", "content": "25C"},
        {"role": "assistant", "content": "Paris 18C, Tokyo 25C."},
        {"role": "user", "content": "Search kimi."},
        {"role": "assistant", "content": "", "reasoning_content": "Search.", "tool_calls": [
            {"id": search, "type": "function", "function": {"name": "web_search", "arguments": '{"query": "kimi"}'}},
        ]},
        {"role": "tool", "tool_call_id": search, "content": "results"},
    ]


CANONICAL_IDS = [["functions.get_weather:0", "functions.get_weather:1"], ["functions.web_search:2"]]
FOREIGN_IDS = {
    "openai": [["call_8f2a9c0b1d", "call_77aa01"], ["call_c3d4e5"]],
    "numeric": [["0", "1"], ["0"]],  # numbered per message, as some clients do
    "anthropic": [["toolu_01A09q90qw90lq917835lq9", "toolu_01B"], ["toolu_01C"]],
}


@pytest.mark.parametrize("style", FOREIGN_IDS)
@pytest.mark.parametrize("thinking", [True, False])
def test_foreign_ids_render_as_k25_ids(style, thinking, jinja, tok):
    foreign, canonical = conversation(FOREIGN_IDS[style]), conversation(CANONICAL_IDS)
    before = copy.deepcopy(foreign)
    expected = render(canonical, tools=[WEATHER, SEARCH], thinking=thinking)
    assert "functions.get_weather:1" in expected and "## Return of functions.web_search:2\n" in expected
    assert render(foreign, tools=[WEATHER, SEARCH], thinking=thinking) == expected
    assert jinja.render(foreign, tools=[WEATHER, SEARCH], thinking=thinking) == expected
    assert tok.encode_chat(foreign, tools=[WEATHER, SEARCH], thinking=thinking) == tok.encode(
        expected, allow_special=True)
    assert foreign == before  # the caller's messages are not changed


@pytest.mark.parametrize("style", FOREIGN_IDS)
def test_foreign_ids_map_back(style):
    foreign = conversation(FOREIGN_IDS[style])
    before = copy.deepcopy(foreign)
    messages, ids = normalize_tool_ids(foreign)
    assert messages == conversation(CANONICAL_IDS)
    assert foreign == before
    ours = [i for group in CANONICAL_IDS for i in group]
    theirs = [i for group in FOREIGN_IDS[style] for i in group]
    assert ids == ToolIdMap(dict(zip(ours, theirs, strict=True)))
    assert [ids.restore(m) for m in messages] == foreign
    assert ids.to_client("functions.get_weather:1") == FOREIGN_IDS[style][0][1]
    assert ids.to_client("functions.other:7") == "functions.other:7"  # ids it did not rewrite stay


def test_canonical_ids_are_kept():
    for case in CASES:
        messages, ids = normalize_tool_ids(case["messages"])
        assert messages == case["messages"] and not ids and len(ids) == 0, case["name"]
    # K2's own histories may number per message: such ids stay too
    messages = conversation([["functions.get_weather:0", "functions.get_weather:1"], ["functions.web_search:0"]])
    assert normalize_tool_ids(messages) == (messages, ToolIdMap())


def test_mixed_ids_never_collide():
    # the search call's id names another function: it is rewritten too
    messages = conversation([["call_a", "functions.get_weather:0"], ["functions.get_weather:2"]])
    out, ids = normalize_tool_ids(messages)
    assert [c["id"] for c in out[2]["tool_calls"]] == ["functions.get_weather:1", "functions.get_weather:0"]
    assert [out[3]["tool_call_id"], out[4]["tool_call_id"]] == ["functions.get_weather:1", "functions.get_weather:0"]
    assert out[7]["tool_calls"][0]["id"] == out[8]["tool_call_id"] == "functions.web_search:2"
    assert ids.client_ids == {"functions.get_weather:1": "call_a", "functions.web_search:2": "functions.get_weather:2"}


def test_tool_results_answer_the_latest_calls():
    call = {"id": "0", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [call, call]},  # one id twice: answered in order
        {"role": "tool", "tool_call_id": "0", "content": "a"},
        {"role": "tool", "tool_call_id": "0", "content": "b"},
        {"role": "tool", "tool_call_id": "unknown", "content": "c"},  # answers nothing: left as it is
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "0", "content": "d"},
    ]
    out, ids = normalize_tool_ids(messages)
    assert [m.get("tool_call_id") for m in out[2:5]] == ["functions.f:0", "functions.f:1", "unknown"]
    assert out[5]["tool_calls"][0]["id"] == out[6]["tool_call_id"] == "functions.f:2"
    assert set(ids.client_ids.values()) == {"0"}
    with pytest.raises(ValueError, match="message 1, tool call 0: 'id' must be a string"):
        normalize_tool_ids([messages[0], {"role": "assistant", "tool_calls": [{**call, "id": 0}]}])


def test_is_canonical_id():
    assert is_canonical_id("functions.get_weather:12", "get_weather")
    assert is_canonical_id("functions.web.search:0", "web.search")
    for bad in ("get_weather:0", "functions.get_weather", "functions.get_weather:", "functions.get_weather:1a",
                "functions.search:0", "functions.get_weather:٣"):
        assert not is_canonical_id(bad, "get_weather"), bad


# ---- the model's calls with foreign ids are named from the declared tools


def section(*calls: tuple[str, str]) -> str:
    return "r</think>" + SECTION + "".join(f"{CALL}{i}{ARGS}{a}{END}" for i, a in calls) + SECTION_END + "<|im_end|>"


def stream(text: str, size: int | None = None, split: int | None = None, **kwargs) -> tuple[ParsedOutput, list]:
    """Streams ``text`` in chunks of ``size`` (or in two pieces at ``split``); the result and the deltas."""
    parser = StreamParser(**kwargs)
    if split is not None:
        chunks = [text[:split], text[split:]]
    else:
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
    deltas = [parser.feed(c) for c in chunks]
    deltas.append(parser.close())
    return parser.result, deltas


def assert_streams_like_whole(text: str, **kwargs) -> ParsedOutput:
    """Every chunking gives the whole parse, and the deltas add up to it."""
    whole = parse_output(text, **kwargs)
    chunkings = [{"size": s} for s in range(1, len(text) + 1)] + [{"split": k} for k in range(len(text) + 1)]
    for chunking in chunkings:
        result, deltas = stream(text, **chunking, **kwargs)
        assert result == whole, chunking
        assert [c for d in deltas for c in d.tool_calls] == whole.tool_calls, chunking
        assert [w for d in deltas for w in d.warnings] == whole.warnings, chunking
        assert "".join(d.content for d in deltas) == whole.content, chunking
    return whole


@pytest.mark.parametrize("call_id", ["0", "3", "call_8f2a9c0b1d", "toolu_01A09q90", "functions.0", "get_weather",
                                     "functions.get_weather"])
def test_recovered_with_one_tool(call_id):
    text = section((call_id, '{"city": "Paris"}'))
    out = assert_streams_like_whole(text, tools=[WEATHER])
    assert out.tool_calls == [ToolCall(call_id, "get_weather", {"city": "Paris"}, '{"city": "Paris"}', None, True)]
    (warning,) = out.warnings
    assert warning.startswith(f"tool call 0: id {call_id!r} is not of the form functions.NAME:INDEX; "
                              "named 'get_weather' after ")
    # without the tools it is an error call, as before
    (call,) = parse_output(text).tool_calls
    assert call.error == f"id {call_id!r} is not of the form functions.NAME:INDEX" and not call.recovered


def test_recovered_with_several_tools_by_argument_keys():
    text = section(("0", '{"city": "Paris", "unit": "c"}'), ("1", '{"query": "kimi"}'),
                   ("call_x", '{"query": "kimi", "top_k": "3"}'), ("toolu_9", "{}"),
                   ("functions.web_search:4", '{"query": "ok"}'))
    out = assert_streams_like_whole(text, tools=[WEATHER, SEARCH, TIME])
    assert [(c.id, c.name, c.recovered, c.error) for c in out.tool_calls] == [
        ("0", "get_weather", True, None), ("1", "web_search", True, None), ("call_x", "web_search", True, None),
        ("toolu_9", "get_time", True, None),  # no required keys: {} fits get_time only
        ("functions.web_search:4", "web_search", False, None),
    ]
    assert len(out.warnings) == 4 and all("argument keys" in w for w in out.warnings)
    assert out.to_message()["tool_calls"][0] == {
        "id": "0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}


@pytest.mark.parametrize("arguments,why", [
    ('{"city": "Paris"}', "the argument keys match 2 declared tools (get_forecast, get_weather)"),
    ('{"city": "Paris", "country": "FR"}', "no declared tool's parameters match its argument keys"),
    ('{"unit": "c"}', "no declared tool's parameters match its argument keys"),  # city is required
    ('{"city": "Paris"', "its arguments are not an object to match the declared tools against"),
])
def test_ambiguous_calls_stay_errors(arguments, why):
    text = section(("0", arguments))
    out = assert_streams_like_whole(text, tools=[WEATHER, FORECAST])
    (call,) = out.tool_calls
    assert (call.id, call.name, call.recovered) == ("0", "0", False)
    assert call.error.endswith(f"id '0' is not of the form functions.NAME:INDEX ({why})")
    assert out.warnings == []


def test_prefixless_ids_naming_no_declared_tool():
    text = section(("call_8f2a:0", '{"query": "kimi"}'), ("get_weather:1", '{"city": "Paris"}'),
                   ("toolu_x:2", '{"city": "Paris"}'))
    out = assert_streams_like_whole(text, tools=[WEATHER, SEARCH, FORECAST])
    assert [(c.name, c.recovered, c.error) for c in out.tool_calls] == [
        ("web_search", True, None), ("get_weather", False, None),
        ("toolu_x", False, None),  # the tools do not settle it (get_weather or get_forecast): read as before
    ]
    assert out.warnings == [("tool call 0: id 'call_8f2a:0' names no declared tool; named 'web_search' after the "
                             "only declared tool whose parameters match its argument keys")]
    assert [c.name for c in parse_output(text).tool_calls] == ["call_8f2a", "get_weather", "toolu_x"]


def test_cut_off_recovered_call_keeps_its_error():
    out = assert_streams_like_whole(f"{SECTION}{CALL}0{ARGS}{{\"city\": \"Paris\"}}", tools=[WEATHER, SEARCH])
    (call,) = out.tool_calls
    assert (call.name, call.recovered, call.error) == ("get_weather", True, "cut off before <|tool_call_end|>")


def test_declared_tools():
    tools = [WEATHER, {"type": "function", "function": {"name": "bare"}}, {"type": "retrieval"},
             {"type": "function", "function": {"name": "odd", "parameters": {"properties": [], "required": "x"}}}]
    assert declared_tools(tools) == [
        DeclaredTool("get_weather", frozenset({"city", "unit"}), frozenset({"city"})),
        DeclaredTool("bare", frozenset(), frozenset()), DeclaredTool("odd", frozenset(), frozenset())]
    assert declared_tools(None) == []
    with pytest.raises(ValueError, match="tools must be a list"):
        StreamParser(tools=WEATHER)


def test_recovered_call_goes_back_with_a_k25_id():
    """The model's reply with a foreign id, appended to the history with its result, renders as
    functions.NAME:INDEX, and the map gives back the id the client saw."""
    history = conversation(FOREIGN_IDS["openai"])
    reply = parse_output(section(("0", '{"city": "Oslo"}')), tools=[WEATHER, SEARCH]).to_message()
    messages = [*history, {"role": "user", "content": "And Oslo?"}, reply,
                {"role": "tool", "tool_call_id": "0", "content": "3C"}]
    text = render(messages, tools=[WEATHER, SEARCH])
    assert f"{CALL}functions.get_weather:3{ARGS}" in text and "## Return of functions.get_weather:3\n3C" in text
    assert f"{CALL}0" not in text
    assert normalize_tool_ids(messages)[1].to_client("functions.get_weather:3") == "0"


# ---- a tool-call section without calls is reported


@pytest.mark.parametrize("text,warning", [
    (f"a{SECTION}{SECTION_END}b", "a tool-call section held no tool call: it held nothing"),
    (f"a{SECTION} get_weather({{\"city\": \"Paris\"}}) {SECTION_END}",
     "a tool-call section held no tool call: it held only the text 'get_weather({\"city\": \"Paris\"})'"),
    (f"a{SECTION}{ARGS}{{}}<|im_end|>",
     "a tool-call section held no tool call (cut off: <|im_end|> came inside it): it held only the text '{}'"),
    (f"a{SECTION}\n", "a tool-call section held no tool call (cut off: the output ended inside it): it held nothing"),
    (f"a{SECTION}{'x' * 250}{SECTION_END}",
     f"a tool-call section held no tool call: it held only the text '{'x' * 200}'..."),
])
def test_empty_section_is_a_warning(text, warning):
    out = assert_streams_like_whole(text, thinking=False)
    assert (out.tool_calls, out.warnings) == ([], [warning])
    assert out.content.startswith("a")


def test_sections_with_calls_warn_of_nothing():
    text = f"{SECTION}{CALL}functions.f:0{ARGS}{{}}{END}{SECTION_END}{SECTION}oops{SECTION_END}"
    out = assert_streams_like_whole(text, thinking=False)
    assert len(out.tool_calls) == 1
    assert out.warnings == ["a tool-call section held no tool call: it held only the text 'oops'"]
    assert parse_output(f"{CALL}functions.f:0{ARGS}{{}}{END}<|im_end|>").warnings == []  # a call without a section


# ---- generate: the declared tools name the reply's calls, and the id map comes back


class _ScriptedEngine:
    """Stands in for the engine: every prompt gets the same reply."""

    max_length = 4096

    def __init__(self, model, reply: list[int]):
        self.model, self.reply, self.prompts = model, reply, []

    def submit(self, ids, **kwargs):
        self.prompts.append(ids)
        return types.SimpleNamespace(token_ids=list(self.reply))

    def run(self):
        pass


def test_generate_names_calls_and_returns_the_id_map(tok):
    from kimi_jax.inference.generate import generate

    model = types.SimpleNamespace(vision_config=None, config=types.SimpleNamespace(
        media_placeholder_token_id=None, eos_token_ids=[], text=types.SimpleNamespace(
            vocab_size=1024, max_position_embeddings=8192)))
    reply = tok.encode(section(("0", '{"query": "kimi"}')), allow_special=True)
    engine = _ScriptedEngine(model, reply)
    canonical = conversation(CANONICAL_IDS)
    results = generate(model, [conversation(FOREIGN_IDS["openai"]), canonical, "raw"], tokenizer=tok,
                       tools=[WEATHER, SEARCH], engine=engine, temperature=0.0)
    foreign_result, canonical_result, raw_result = results
    assert engine.prompts[0] == engine.prompts[1] == tok.encode_chat(canonical, tools=[WEATHER, SEARCH])
    assert foreign_result.tool_ids.to_client("functions.web_search:2") == "call_c3d4e5"
    assert canonical_result.tool_ids == ToolIdMap() and raw_result.tool_ids is None
    (call,) = foreign_result.parsed.tool_calls
    assert (call.name, call.recovered, call.error) == ("web_search", True, None)
