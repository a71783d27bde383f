"""The command line: demo, generate and chat on the demo's converted checkpoint (the ``demo`` fixture)."""

import io
import shlex
import shutil

import numpy as np
import pytest

import kimi_jax
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.cli.common import CONTROL_ESCAPES
from kimi_jax.cli.main import main

FAST = ["--dtype", "float32", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def model(demo):
    converted, _ = demo
    return kimi_jax.load(converted, dtype="float32")


def test_demo_writes_a_working_checkpoint(demo, model):
    converted, _ = demo
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (converted / name).is_file()
    ids = np.arange(1, 9)[None]
    logits = np.asarray(model(ids))
    assert logits.shape == (1, 8, model.config.text.vocab_size) and np.isfinite(logits).all()
    [result] = kimi_jax.generate(model, [[{"role": "user", "content": "Hello!"}]], tokenizer=converted,
                                 mode="instant", max_new_tokens=8)
    assert len(result.token_ids) >= 1 and result.text and len(result.prompt_ids) > 3


def test_demo_agent_answers_with_the_calculator(demo):
    _, out = demo
    assert out.count("[answer: 2 steps, 1 tool calls") == 2  # both modes: a call, its result, the answer
    assert '[agent step 0: call calculator] {"expression": "37 * 12"}' in out
    assert "37 times 12 is 444." in out and "250 centimeters is 2.5 meters." in out


def _printed(parsed) -> str:
    """What the reply printer shows for a parsed reply (not on a terminal)."""
    calls = "".join(f"{c.name} {c.raw_arguments}" + (f"  ({c.error})" if c.error else "") + "\n"
                    for c in parsed.tool_calls)
    sections = [("thinking", parsed.reasoning), ("answer", parsed.content), ("tool calls", calls)]
    return "\n".join(f"[{name}]\n{text.translate(CONTROL_ESCAPES)}" for name, text in sections if text) + "\n"


@pytest.mark.parametrize("mode, header", [("thinking", "[thinking]"), ("instant", "[answer]")])
def test_generate_streams_a_chat_reply(demo, capsys, monkeypatch, mode, header):
    converted, _ = demo
    results = []

    def spy(model, prompts, **kwargs):
        results.extend(generate(model, prompts, **kwargs))
        return results

    generate = kimi_jax.generate
    monkeypatch.setattr(kimi_jax, "generate", spy)
    assert main(["generate", str(converted), "--prompt", "Hello", "--mode", mode, *FAST]) == 0
    out, err = capsys.readouterr()
    [result] = results
    assert out == _printed(result.parsed)  # the streamed reply is the parsed reply, section by section
    assert out.startswith(header + "\n")  # thinking mode opens with the reasoning, instant with the answer
    assert (mode == "thinking") == bool(result.parsed.reasoning)
    assert f"[{len(result.prompt_ids)} prompt tokens, {len(result.token_ids)} generated, {result.finish_reason}]" in err


def test_generate_raw_and_ids(demo, capsys):
    converted, _ = demo
    assert main(["generate", str(converted), "--prompt", "Hello", "--raw", "--mode", "instant", *FAST]) == 0
    out, err = capsys.readouterr()
    assert "[answer]" not in out and "[4 prompt tokens" in err  # H, el, l, o: no chat template
    assert main(["generate", str(converted), "--ids", "72,101,108", "--mode", "instant", *FAST]) == 0
    assert "[3 prompt tokens" in capsys.readouterr().err


def test_checkpoint_without_tokenizer(demo, tmp_path, capsys):
    converted, _ = demo
    bare = shutil.copytree(converted, tmp_path / "bare")
    (bare / "tiktoken.model").unlink()
    assert main(["generate", str(bare), "--prompt", "Hello", *FAST]) == 2
    err = capsys.readouterr().err
    assert "tiktoken.model not found" in err and "--ids" in err
    assert main(["generate", str(bare), "--ids", "1,2,3", "--mode", "instant", *FAST]) == 0
    out = capsys.readouterr().out
    assert all(t.isdigit() for t in out.split())


def test_chat_keeps_history(demo, capsys, monkeypatch):
    converted, _ = demo
    calls = []

    def spy(model, prompts, **kwargs):
        calls.append([dict(m) for m in prompts[0]])
        return generate(model, prompts, **kwargs)

    generate = kimi_jax.generate
    monkeypatch.setattr(kimi_jax, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n\nAnd then?\n/exit\nnever read\n"))
    assert main(["chat", str(converted), "--system", "Be brief.", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 4  # two turns, the empty line, /exit
    assert [m["role"] for m in calls[0]] == ["system", "user"]
    assert [m["role"] for m in calls[1]] == ["system", "user", "assistant", "user"]
    assert calls[1][1]["content"] == "Hi there" and calls[1][3]["content"] == "And then?"


def test_demo_answers_about_a_picture(demo, capsys):
    converted, out = demo
    picture = converted.parent / "picture.png"
    assert picture.is_file()
    [command] = [line.split("next: ", 1)[1] for line in out.splitlines() if "next: kimi-jax generate" in line]
    argv = shlex.split(command)[1:]  # the command the demo suggests runs, and sees the picture
    assert str(picture) in argv
    assert main([*argv, "--dtype", "float32", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    tokenizer = Tokenizer.from_dir(converted)
    text_only = len(tokenizer.encode(tokenizer.chat_template.render(
        [{"role": "user", "content": "What is in this picture?"}], thinking=False)))
    prompt_tokens = int(err.split("[", 1)[1].split(" prompt tokens")[0])
    assert prompt_tokens > text_only + 1  # the picture's vision tokens joined the prompt
