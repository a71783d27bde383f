"""Agent Swarm with scripted K2.5 replies: sub-agents decode together, as their one-by-one runs would."""

import json
import re

from kimi_jax.agents import Agent, Swarm, calculator
from kimi_jax.agents.scripted import ScriptedEngine, calls, last_user, returns
from kimi_jax.agents.swarm import DEFAULT_SUBAGENT_SYSTEM

ITEMS = [f"{a} * {b}" for a, b in zip(range(2, 18), range(30, 46), strict=True)]  # 16 sub-tasks


def subagent_script(prompt):
    """A sub-agent: computes its item with the calculator (items of odd index in two calls), then answers."""
    expression = last_user(prompt).removeprefix("Compute ")
    a, b = (int(x) for x in expression.split(" * "))
    n = returns(prompt)
    if n == 0:
        return f"Compute {expression}." + calls(("functions.calculator:0", json.dumps({"expression": expression})))
    if n == 1 and a % 2:
        return "Check it.</think>" + calls(("functions.calculator:1", json.dumps({"expression": f"{b} * {a}"})))
    return f"</think>{expression} = {a * b}"


def orchestrator_script(prompt):
    if "<agent_swarm_result>" not in prompt:
        return "Fan out." + calls(("functions.AgentSwarm:0", json.dumps({
            "description": "products", "prompt_template": "Compute {{item}}", "items": ITEMS})))
    answers = re.findall(r'outcome="completed">(.*?)</subagent>', prompt)
    return "</think>" + "; ".join(answers)


def script(prompt):
    return subagent_script(prompt) if DEFAULT_SUBAGENT_SYSTEM in prompt else orchestrator_script(prompt)


def test_swarm_of_16_equals_one_by_one_in_fewer_steps(tok):
    engine = ScriptedEngine(tok, script)
    swarm = Swarm(engine, [calculator], tokenizer=tok)
    result = swarm.run("Compute all sixteen products.")
    assert result.orchestrator.finish_reason == "answer" and len(result.subagents) == 16
    assert result.answer == "; ".join(f"{i} = {eval(i)}" for i in ITEMS)  # noqa: S307 - test data
    assert engine.widest == 16  # one step served all sub-agents

    alone = ScriptedEngine(tok, script)
    worker = Agent(alone, [calculator], tokenizer=tok, system=DEFAULT_SUBAGENT_SYSTEM, max_steps=100)
    for run in result.subagents:
        solo = worker.run(f"Compute {run.item}")
        assert run.prompt == f"Compute {run.item}"
        assert run.result.messages == solo.messages and run.result.answer == solo.answer
    sub_steps = sum(len(r.result.steps) for r in result.subagents)
    assert sub_steps == 16 * 2 + 8  # odd items take one more step
    assert result.engine_steps < alone.steps
    assert result.critical_steps == 2 + 3  # orchestrator replies + the longest sub-agent
    text = result.orchestrator.messages[2]["content"]
    assert text.startswith("<agent_swarm_result><summary>16 of 16 sub-agents completed</summary>")
    assert '<subagent agent_id="0" item="2 * 30" outcome="completed">2 * 30 = 60</subagent>' in text


def test_subagents_share_the_prefix(tok):
    engine = ScriptedEngine(tok, script)
    Swarm(engine, [calculator], tokenizer=tok).run("Go.")
    first = [p for p in engine.prompts if DEFAULT_SUBAGENT_SYSTEM in tok.decode(p)][:16]
    shared = tok.encode_chat([{"role": "system", "content": DEFAULT_SUBAGENT_SYSTEM}], tools=[calculator.schema],
                             add_generation_prompt=False)
    assert all(p[: len(shared)] == shared for p in first)


def create_task_script(prompt):
    if "<|im_system|>system<|im_middle|>You are a checker." in prompt:
        return "</think>checked: " + last_user(prompt)
    n = returns(prompt)
    if n == 0:
        return calls(("functions.CreateSubagent:0", '{"name": "checker", "system_prompt": "You are a checker."}'))
    if n == 1:
        return calls(*((f"functions.Task:{i}", json.dumps({"description": "check", "subagent_name": "checker",
                                                             "prompt": f"claim {i}"})) for i in range(1, 4)),
                     ("functions.Task:4", '{"description": "x", "subagent_name": "nobody", "prompt": "p"}'))
    return "</think>all checked"


def test_create_subagent_and_parallel_tasks(tok):
    engine = ScriptedEngine(tok, create_task_script)
    result = Swarm(engine, tokenizer=tok).run("Check three claims.")
    tools = [m for m in result.orchestrator.messages if m["role"] == "tool"]
    assert tools[0]["content"] == "Created sub-agent 'checker'."
    assert [t["content"] for t in tools[1:4]] == [f"checked: claim {i}" for i in range(1, 4)]
    assert tools[4]["content"].startswith("Error: no sub-agent named 'nobody' (created: checker)")
    assert engine.widest == 3 and [r.name for r in result.subagents] == ["checker"] * 3
    assert {r.stage for r in result.subagents} == {1} and result.critical_steps == 3 + 1


def test_swarm_arguments_are_checked(tok):
    def orchestrator(prompt):
        if returns(prompt) == 0:
            return calls(("functions.AgentSwarm:0", '{"description": "d", "prompt_template": "no item", "items": ["a", "b"]}'),
                         ("functions.AgentSwarm:1", '{"description": "d", "prompt_template": "{{item}}", "items": ["a"]}'))
        return "</think>gave up"

    result = Swarm(ScriptedEngine(tok, orchestrator), tokenizer=tok).run("Go.")
    first, second = result.orchestrator.tool_calls
    assert "does not match" in first.result and "is too short" in second.result and not result.subagents
