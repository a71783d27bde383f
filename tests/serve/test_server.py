"""The server on loopback with the official openai client: both modes, streaming, images,
tools, concurrency, disconnects and every kind of bad request."""

import base64
import concurrent.futures
import http.client
import io
import json
import re
import time
import urllib.error
import urllib.request

import jsonschema
import numpy as np
import openai
import pytest
from PIL import Image

import kimi_jax
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.inference.engine import Engine
from kimi_jax.serve.stream import OutputStream

MODEL = "kimi-k2.5"
INSTANT = {"chat_template_kwargs": {"thinking": False}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 4}, "unit": {"enum": ["c", "f"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
ALARM = {"type": "function", "function": {"name": "set-alarm", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}, "hour": {"type": "integer", "minimum": 0, "maximum": 23}},
    "required": ["on", "hour"], "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "set-alarm": ALARM["function"]["parameters"]}


def send(url, body=None, raw=None):
    """(status, headers, text) of a GET, or a POST of JSON ``body`` (or the bytes ``raw``)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


@pytest.fixture(scope="module")
def engine(model, shape):
    """An engine of the server's shapes (so it compiles nothing new), for the expected outputs."""
    return Engine(model, **shape)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def chat(client, text, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)


def streamed(client, text, **kwargs):
    """(reasoning, content, tool calls as {index: [id, name, arguments]}, finish_reason, usage) of a stream."""
    reasoning = content = ""
    calls, finish, usage = {}, None, None
    for chunk in chat(client, text, stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, [None, None, ""])
                if piece.id:
                    assert call[0] is None, "id and name come once, first"
                    call[0], call[1] = piece.id, piece.function.name
                call[2] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return reasoning, content, calls, finish, usage


def test_models_health_metrics(served, client):
    [model] = client.models.list().data
    assert model.id == MODEL
    assert json.loads(send(served[0] + "/health")[2]) == {"status": "ok"}
    chat(client, "hi", max_tokens=2, temperature=0)
    metrics = send(served[0] + "/metrics")[2]
    for name in ("kimi_jax_requests_total", "kimi_jax_generated_tokens_total", "kimi_jax_queue_length",
                 "kimi_jax_slots_used", "kimi_jax_time_to_first_token_seconds_count",
                 "kimi_jax_inter_token_latency_seconds_count"):
        assert name in metrics


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_equals_generate_and_stream_equals_whole(client, model, engine, checkpoint, thinking):
    """Greedy replies equal kimi_jax.generate's, parsed the same; the stream adds up to the whole reply."""
    messages = [{"role": "user", "content": "Hello Kimi, what is the answer?"}]
    extra = {} if thinking else INSTANT
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                           extra_body=extra)
    [result] = kimi_jax.generate(model, [messages], tokenizer=checkpoint, mode="thinking" if thinking else "instant",
                                 max_new_tokens=24, temperature=0, engine=engine)
    expected = OutputStream(Tokenizer.from_dir(checkpoint), thinking=thinking)
    for token in result.token_ids:
        expected.feed(token)
    expected.close()
    if max(result.token_ids[:-1]) < expected._tok.num_base_tokens:  # no special ids: the text parser agrees
        assert (expected.reasoning, expected.content) == (result.parsed.reasoning, result.parsed.content)
    message = reply.choices[0].message
    assert (getattr(message, "reasoning_content", None) or "") == expected.reasoning
    assert (message.content or "") == expected.content
    assert reply.usage.completion_tokens == len(result.token_ids)
    assert reply.usage.prompt_tokens == len(result.prompt_ids)
    assert reply.choices[0].finish_reason == result.finish_reason
    reasoning, content, calls, finish, usage = streamed(client, messages[0]["content"], max_tokens=24, temperature=0,
                                                        extra_body=extra)
    assert (reasoning, content, finish) == (expected.reasoning, expected.content, result.finish_reason)
    assert usage.completion_tokens == len(result.token_ids)


def test_stop_strings(client):
    """A stop string ends the content before it, finish_reason stop, streamed or not."""
    whole = chat(client, "Hello Kimi", max_tokens=24, temperature=0, extra_body=INSTANT).choices[0].message.content
    assert len(whole) > 6
    stop = whole[3:6]
    cut = chat(client, "Hello Kimi", max_tokens=24, temperature=0, stop=[stop], extra_body=INSTANT)
    assert cut.choices[0].message.content == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    _, content, _, finish, _ = streamed(client, "Hello Kimi", max_tokens=24, temperature=0, stop=stop,
                                        extra_body=INSTANT)
    assert (content, finish) == (whole[: whole.index(stop)], "stop")


def test_moonshot_thinking_switch(client):
    a = chat(client, "hi", max_tokens=8, temperature=0, extra_body={"thinking": {"type": "disabled"}})
    b = chat(client, "hi", max_tokens=8, temperature=0, extra_body=INSTANT)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content
    assert not getattr(a.choices[0].message, "reasoning_content", None)


def test_image_data_url(client):
    png = io.BytesIO()
    Image.fromarray(np.full((28, 42, 3), 200, np.uint8)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    with_image = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                                max_tokens=4, temperature=0)
    without = chat(client, "What is this?", max_tokens=4, temperature=0)
    assert with_image.usage.prompt_tokens > without.usage.prompt_tokens
    parts[0]["image_url"]["url"] = "https://example.com/cat.png"
    with pytest.raises(openai.BadRequestError, match="remote image"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=4)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set-alarm"}}])
def test_forced_tool_calls_valid(client, choice):
    """Forced calls (sampled, several seeds, streamed and not) always validate. With
    parallel_tool_calls the random model may chain calls until the budget cuts the last one
    off; every complete call validates. Instant mode: in Thinking mode the random model's
    reasoning rarely ends within a test's budget (the forcing after ``</think>`` is tested in
    test_grammar)."""
    for seed in range(6):
        parallel = seed >= 4
        kwargs = dict(tools=[WEATHER, ALARM], tool_choice=choice, max_tokens=300, temperature=1.0, seed=seed,
                      parallel_tool_calls=parallel, extra_body=INSTANT)
        if seed % 2 == 0:
            reply = chat(client, "Set an alarm", **kwargs)
            finish = reply.choices[0].finish_reason
            calls = {i: [c.id, c.function.name, c.function.arguments]
                     for i, c in enumerate(reply.choices[0].message.tool_calls)}
        else:
            _, _, calls, finish, _ = streamed(client, "Set an alarm", **kwargs)
        if not parallel:
            assert finish == "tool_calls" and len(calls) == 1
        for i, (call_id, name, arguments) in calls.items():
            if isinstance(choice, dict):
                assert name == "set-alarm"
            assert call_id.startswith(f"functions.{name}:")
            if finish == "length" and i == len(calls) - 1:
                continue  # cut off by max_tokens
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_auto_tools_and_tool_results(client):
    """auto leaves the choice to the model; a tool turn with the model's own ids renders and runs."""
    reply = chat(client, "Weather in Oslo?", tools=[WEATHER], max_tokens=16, temperature=0, extra_body=INSTANT)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "sunny"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=4,
                                           temperature=0)
    assert reply.usage.prompt_tokens > 40


def test_concurrent_streams_equal_alone(served, client):
    """16 greedy streams at once (more than the slots, so some wait) each equal the same request alone."""
    prompts = [f"Question {i}: what is {i} and {i * 7}?" for i in range(16)]

    def run(prompt):
        reasoning, content, _, finish, usage = streamed(client, prompt, max_tokens=12, temperature=0)
        return reasoning, content, finish, usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts))
    alone = [run(p) for p in prompts[:4]] + [run(prompts[-1])]
    assert together[:4] + together[-1:] == alone
    assert len(set(together)) > 1


def test_disconnect_frees_the_slot(served, shape):
    base, app = served
    worker = app.state.server.worker
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story"}], "stream": True,
            "max_tokens": shape["max_length"], "temperature": 1.0, "seed": 0}  # seeded: never a stop id this early
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    received = [response.readline() for _ in range(6)]
    assert received[0].startswith(b"data: ")
    assert worker.load()[0] == 1
    connection.close()
    deadline = time.monotonic() + 120  # generous: a loaded CI machine
    while worker.load()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.load() == (0, 0)


def test_busy_and_stopped_engine(served, client, monkeypatch):
    worker = served[1].state.server.worker
    monkeypatch.setattr(worker, "capacity", 0)
    with pytest.raises(openai.RateLimitError) as e:
        chat(client, "hi", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    monkeypatch.setattr(worker, "_stopping", True)
    with pytest.raises(openai.InternalServerError) as e:
        chat(client, "hi", max_tokens=2)
    assert e.value.status_code == 503 and "retry-after" in e.value.response.headers
    assert send(served[0] + "/health")[0] == 503


@pytest.mark.parametrize("change, message", [
    ({"model": "gpt-4"}, "model 'gpt-4' is not served here"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"n": 2}, "n must be 1"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"presence_penalty": 0.5}, "presence_penalty is not supported"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
    ({"messages": [{"content": "no role"}]}, "invalid messages"),
    ({"messages": "hello"}, "invalid request: messages"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "not a function with a name"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "not among the tools"),
    ({"messages": [{"role": "user", "content": "word " * 1100}]}, "leaves no room for a reply"),
])
def test_bad_requests(served, change, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    status, _, text = send(served[0] + "/v1/chat/completions", body)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error"
    assert re.search(message, error["message"]), error["message"]


def test_malformed_json_body(served):
    status, _, text = send(served[0] + "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "error" in json.loads(text)


def test_completions_equal_the_engine(served, client, engine, checkpoint):
    tokenizer = Tokenizer.from_dir(checkpoint)
    prompt = "Hello Kimi"
    request = engine.submit(tokenizer.encode(prompt), max_new_tokens=6, stop_ids=tokenizer.stop_ids)
    engine.run()
    ids = [t for t in request.token_ids if t < tokenizer.num_base_tokens]
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert reply.choices[0].text == tokenizer.decode(ids)
    assert reply.usage.completion_tokens == len(request.token_ids)
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == reply.choices[0].text
    with pytest.raises(openai.BadRequestError, match="echo is not supported"):
        client.completions.create(model=MODEL, prompt=prompt, echo=True)
