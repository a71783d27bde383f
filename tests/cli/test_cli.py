"""The command line: demo, generate and chat on the demo's converted checkpoint."""

import io
import shutil

import pytest

import kimi_jax
from kimi_jax.cli.main import main

FAST = ["--dtype", "float32", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        out = io.StringIO()
        mp.setattr("sys.stdout", out)
        assert main(["demo", "--dir", str(work)]) == 0
    return work / "converted", out.getvalue()


def test_demo_generates_text(demo):
    converted, out = demo
    assert "4. generating a reply" in out
    assert "prompt: <|im_user|>user<|im_middle|>Hello! What is the answer?<|im_end|>" in out
    assert "   output: " in out and "next: kimi-jax generate" in out
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (converted / name).is_file()


@pytest.mark.parametrize("mode, header", [("thinking", "[thinking]"), ("instant", "[answer]")])
def test_generate_streams_a_chat_reply(demo, capsys, mode, header):
    converted, _ = demo
    assert main(["generate", str(converted), "--prompt", "Hello", "--mode", mode, *FAST]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(header) or "[tool calls]" in out
    assert "generated" in err and "prompt tokens" in err


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


def test_demo_answers_about_a_picture(demo):
    converted, out = demo
    assert "5. asking about a synthetic picture" in out and "6 of them the picture's vision features" in out
    assert f"kimi-jax generate {converted} --prompt 'What is in this picture?' --image" in out
