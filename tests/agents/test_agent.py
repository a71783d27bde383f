"""Agent mode end to end through the real chat template and parser, driven by scripted K2.5 replies."""

import threading
import time

import pytest

from kimi_jax.agents import Agent, AgentEvent, as_tool, calculator
from kimi_jax.agents.scripted import ScriptedEngine, calls, returns


def agent(tok, script, tools=(calculator,), **kwargs):
    engine = ScriptedEngine(tok, script)
    return Agent(engine, tools, tokenizer=tok, **kwargs), engine


def test_multi_step_tool_loop(tok, tokenizer_dir):
    def script(prompt):
        if returns(prompt) == 0:  # opens the section without closing </think>, as K2.5 often does
            return "I should compute this." + calls(("functions.calculator:0", '{"expression": "17 * 23"}'))
        if returns(prompt) == 1:
            return "Now add one.</think>Almost." + calls(("functions.calculator:1", '{"expression":"391 + 1"}'))
        return "Done.</think>17 * 23 + 1 = 392."

    events = []
    engine = ScriptedEngine(tok, script)
    result = Agent(engine, [calculator], tokenizer=tokenizer_dir, system="You are Kimi.",
                   on_event=events.append).run("What is 17 * 23 + 1?")
    assert result.finish_reason == "answer" and result.answer == "17 * 23 + 1 = 392."
    assert [(c.id, c.result, c.error) for c in result.tool_calls] == [
        ("functions.calculator:0", "391", None), ("functions.calculator:1", "392", None)]
    assert [m["role"] for m in result.messages] == ["system", "user", "assistant", "tool", "assistant", "tool",
                                                    "assistant"]
    assert result.messages[2]["reasoning_content"] == "I should compute this."
    assert result.messages[3] == {"role": "tool", "tool_call_id": "functions.calculator:0", "name": "calculator",
                                  "content": "391"}
    # each prompt is the conversation so far through the official template, reasoning of the tool-use turn kept
    tools = [calculator.schema]
    assert engine.prompts[2] == tok.encode_chat(result.messages[:6], tools=tools)
    third = tok.decode(engine.prompts[2])
    assert third.startswith("<|im_system|>tool_declare<|im_middle|># Tools")
    assert ("<|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>{\"expression\": \"17 * 23\"}"
            "<|tool_call_end|><|tool_calls_section_end|><|im_end|><|im_system|>calculator<|im_middle|>"
            "## Return of functions.calculator:0\n391<|im_end|>") in third
    assert "<think>I should compute this.</think>" in third and "<think>Now add one.</think>Almost." in third
    assert [s.finish_reason for s in result.steps] == ["stop"] * 3 and result.engine_steps == engine.steps
    kinds = [e.kind for e in events]
    assert kinds.count("tool_call") == 2 and kinds.count("tool_result") == 2 and kinds[-1] == "done"
    assert "".join(e.text for e in events if e.kind == "reasoning" and e.step == 0) == "I should compute this."
    assert "".join(e.text for e in events if e.kind == "content" and e.step == 2) == "17 * 23 + 1 = 392."
    assert all(isinstance(e, AgentEvent) and e.agent == "agent" for e in events)


def test_bad_calls_come_back_as_results(tok):
    def broken(path: str) -> str:
        """Always fails."""
        raise OSError(f"disk on fire reading {path}")

    def script(prompt):
        if returns(prompt) == 0:
            return calls(("functions.calculator:0", '{"expression": 5}'), ("functions.calculator:1", "{}"),
                         ("functions.broken:2", '{"path": "a.txt"}'), ("functions.missing:3", "{}"),
                         ("functions.calculator:4", '{"expression": "1 +'), ("functions.calculator:5", '{"expression": "1/0"}'))
        return "</think>I could not compute it."

    a, _ = agent(tok, script, tools=[calculator, broken])
    result = a.run("Try.")
    errors = [c.result for c in result.tool_calls]
    assert errors[0] == "Error: invalid arguments for calculator: expression: 5 is not of type 'string'"
    assert "'expression' is a required property" in errors[1]
    assert errors[2] == "Error: OSError: disk on fire reading a.txt"
    assert errors[3] == "Error: there is no tool 'missing'; the tools are calculator, broken"
    assert errors[4].startswith("Error: the call could not be read: arguments are not valid JSON")
    assert errors[5] == "Error: ValueError: division by zero"
    assert all(c.error for c in result.tool_calls) and result.answer == "I could not compute it."
    assert [m["content"] for m in result.messages if m["role"] == "tool"] == errors


def test_calls_of_one_step_run_concurrently(tok):
    barrier = threading.Barrier(3, timeout=10)

    def wait(tag: str) -> str:
        """Waits until all three calls are running."""
        barrier.wait()
        return tag

    def script(prompt):
        if returns(prompt) == 0:
            return calls(*((f"functions.wait:{i}", f'{{"tag": "t{i}"}}') for i in range(3)))
        return "</think>ok"

    a, _ = agent(tok, script, tools=[wait])
    result = a.run("Go.")
    assert [c.result for c in result.tool_calls] == ["t0", "t1", "t2"] and result.answer == "ok"


def test_step_limit_stops(tok):
    a, engine = agent(tok, lambda p: calls((f"functions.calculator:{returns(p)}", '{"expression": "1"}')), max_steps=3)
    result = a.run("Loop forever.")
    assert result.finish_reason == "max_steps" and result.answer is None
    assert len(result.steps) == 3 and len(engine.prompts) == 3 and len(result.tool_calls) == 3


def test_reply_cut_off_by_token_budget(tok):
    a, _ = agent(tok, lambda p: "x" * 50, max_new_tokens=8)
    result = a.run("Talk.")
    assert result.finish_reason == "length" and result.steps[0].finish_reason == "length"


def test_context_full(tok):
    a, _ = agent(tok, lambda p: "hi")
    a.engine.max_length = 40
    assert a.run("A task longer than the context. " * 3).finish_reason == "context"


def _round_script(prompt):
    n = prompt.count("<|tool_call_begin|>")  # calls made so far (the policies drop results only)
    if n < 3:
        return calls((f"functions.calculator:{n}", f'{{"expression": "{n + 1} * 1000"}}'))
    return "</think>done"


def test_context_keep_all(tok):
    a, engine = agent(tok, _round_script)
    a.run("Count.")
    assert all(f"Return of functions.calculator:{n}\n{n + 1}000" in tok.decode(engine.prompts[3]) for n in range(3))


def test_context_latest_round(tok):
    a, engine = agent(tok, _round_script, context="latest_round")
    result = a.run("Count.")
    last = tok.decode(engine.prompts[3])
    assert "Return of functions.calculator:2\n3000" in last and returns(last) == 1
    assert "Return of functions.calculator:0" not in last and "Return of functions.calculator:1" not in last
    assert '"1 * 1000"' in last  # the calls stay; only old results go
    assert len([m for m in result.messages if m["role"] == "tool"]) == 3  # the transcript keeps everything


def test_context_discard_all(tok):
    full = ScriptedEngine(tok, _round_script)
    Agent(full, [calculator], tokenizer=tok).run("Count.")
    one, two = len(full.prompts[1]), len(full.prompts[2])
    a, engine = agent(tok, _round_script, context="discard_all", context_limit=(one + two) // 2, max_steps=5)
    result = a.run("Count.")
    prompts = [tok.decode(p) for p in engine.prompts]
    # two rounds pass the limit: both are dropped, the model goes on from the task (and calls again)
    assert [returns(p) for p in prompts] == [0, 1, 0, 1, 0]
    assert all(p.endswith("Count.<|im_end|><|im_assistant|>assistant<|im_middle|><think>") for p in prompts[::2])
    assert len([m for m in result.messages if m["role"] == "assistant"]) == 5 and result.finish_reason == "max_steps"
    with pytest.raises(ValueError, match="context_limit"):
        Agent(engine, [], tokenizer=tok, context="discard_all")


def test_tools_from_callables_and_declarations(tok):
    def search(query: str, top_k: int = 3, site: str | None = None, mode: "list[str] | None" = None) -> list[str]:
        """Search the web.

        Args:
            query: What to look for.
            top_k: How many results.
        """
        return [query] * top_k

    tool = as_tool(search)
    assert tool.schema["function"]["description"] == "Search the web."
    params = tool.parameters
    assert params["required"] == ["query"]
    assert params["properties"]["query"] == {"type": "string", "description": "What to look for."}
    assert params["properties"]["top_k"] == {"type": "integer", "description": "How many results.", "default": 3}
    assert params["properties"]["site"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert tool.validate({"query": "kimi", "top_k": "2"}) == "top_k: '2' is not of type 'integer'"
    assert tool(query="a", top_k=2) == ["a", "a"]
    declared = as_tool({"type": "function", "function": {"name": "ping", "parameters": {"type": "object"}}},
                       lambda: "pong")
    assert declared.name == "ping" and declared() == "pong"
    with pytest.raises(ValueError, match="needs the function"):
        as_tool({"name": "ping"})
    with pytest.raises(TypeError, match="no type hint"):
        as_tool(lambda x: x, name="f")
    with pytest.raises(ValueError, match="two tools share a name"):
        Agent(ScriptedEngine(tok, str), [calculator, calculator], tokenizer=tok)


def test_tool_time_is_recorded(tok):
    def slow() -> str:
        """Sleeps a little."""
        time.sleep(0.05)
        return "ok"

    a, _ = agent(tok, lambda p: calls(("functions.slow:0", "{}")) if not returns(p) else "</think>ok", tools=[slow])
    assert a.run("Wait.").tool_calls[0].seconds >= 0.05
