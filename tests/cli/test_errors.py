"""The command line on bad input: options checked before the model loads, one-line errors
(``--debug`` for the traceback), relative and ``~`` paths, and a chat that survives its turns'
errors and a conversation outgrowing the context."""

import io
import json
import os
import shutil
import subprocess
import sys

import jinja2
import pytest

import kimi_jax
from kimi_jax.cli import generate as generate_command
from kimi_jax.cli.main import build_parser, main

FAST = ["--dtype", "float32", "--max-new-tokens", "4", "--mode", "instant"]


def _copy(demo, tmp_path, name="ck"):
    converted, _ = demo
    return shutil.copytree(converted, tmp_path / name)


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kimi-jax {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ options, before any load


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option, value", [
    ("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "2"), ("--top-k", "-1"),
    ("--max-new-tokens", "0"), ("--prefill-chunk", "0"), ("--seed", "-1"),
])
def test_bad_options_fail_before_the_model_loads(command, option, value, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kimi_jax, "load", no_load)
    prompt = ["--prompt", "hi"] if command == "generate" else []
    with pytest.raises(SystemExit) as exit:
        main([command, "no/such/checkpoint", *prompt, option, value])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "no/such/checkpoint" not in err  # the option, not the missing folder


def test_good_edge_options_are_accepted():
    args = build_parser().parse_args(["generate", "ck", "--prompt", "hi", "--temperature", "0", "--top-p", "1",
                                      "--top-k", "0", "--max-new-tokens", "1", "--prefill-chunk", "1", "--seed", "7"])
    assert (args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.prefill_chunk, args.seed) == (
        0.0, 1.0, 0, 1, 1, 7)


# ------------------------------------------------------------------ one-line errors, --debug


def _raising(monkeypatch, error):
    def run(args):
        raise error

    monkeypatch.setattr(generate_command, "run", run)


@pytest.mark.parametrize("error, shown", [
    (PermissionError(13, "Permission denied", "out/params"), "[Errno 13] Permission denied: 'out/params'"),
    (IsADirectoryError(21, "Is a directory", "ck"), "[Errno 21] Is a directory: 'ck'"),
    (json.JSONDecodeError("Expecting value", "{", 1), "Expecting value: line 1 column 2 (char 1)"),
    (jinja2.TemplateSyntaxError("unexpected '}'", 3), "unexpected '}'; line 3"),
    (RuntimeError("DATA_LOSS: Error reading\nsecond line"), "DATA_LOSS: Error reading; second line"),
    (KeyError("bfloat17"), "KeyError: 'bfloat17' (run with --debug for the traceback)"),
    (TypeError("'<' not supported"), "TypeError: '<' not supported (run with --debug for the traceback)"),
])
def test_errors_are_one_line(error, shown, capsys, monkeypatch):
    _raising(monkeypatch, error)
    assert main(["generate", "ck", "--prompt", "hi"]) == 2
    assert _one_error_line(capsys.readouterr().err, "generate") == f"kimi-jax generate: error: {shown}"


def test_debug_raises_and_interrupt_exits_130(capsys, monkeypatch):
    _raising(monkeypatch, TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        main(["--debug", "generate", "ck", "--prompt", "hi"])
    _raising(monkeypatch, KeyboardInterrupt())
    assert main(["generate", "ck", "--prompt", "hi"]) == 130
    assert capsys.readouterr().err.strip() == "kimi-jax generate: interrupted"


def test_bad_checkpoint_files_are_one_line(demo, tmp_path, capsys):
    template = _copy(demo, tmp_path, "template")
    (template / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    eos = _copy(demo, tmp_path, "eos")
    (eos / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    dtype = _copy(demo, tmp_path, "dtype")
    info = json.loads((dtype / "kimi_jax.json").read_text())
    (dtype / "kimi_jax.json").write_text(json.dumps(info | {"dtype": "bfloat17"}))

    assert main(["generate", str(template), "--prompt", "hi", *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "generate")
    assert main(["chat", str(eos), *FAST]) == 2
    line = _one_error_line(capsys.readouterr().err, "chat")
    assert "generation_config.json" in line and "eos_token_id" in line and "'x'" in line
    assert main(["generate", str(dtype), "--prompt", "hi", *FAST]) == 2
    assert "bfloat17" in _one_error_line(capsys.readouterr().err, "generate")


def test_the_installed_command(demo, tmp_path):
    """``python -m kimi_jax.cli.main``: one line and exit 2; ``--debug``: the traceback."""
    eos = _copy(demo, tmp_path, "eos")
    (eos / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, "x"]}))
    command = [sys.executable, "-m", "kimi_jax.cli.main"]
    plain = subprocess.run([*command, "generate", str(eos), "--prompt", "hi"], capture_output=True, text=True, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    [line] = [line for line in plain.stderr.splitlines() if "error" in line]
    assert line.startswith("kimi-jax generate: error: ") and "generation_config.json: eos_token_id" in line
    debug = subprocess.run([*command, "--debug", "generate", str(eos), "--prompt", "hi"], capture_output=True, text=True, check=False)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ValueError:" in debug.stderr and "generation_config.json: eos_token_id" in debug.stderr


# ------------------------------------------------------------------ paths


def test_relative_and_home_paths(demo, tmp_path, capsys, monkeypatch):
    converted, _ = demo
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(converted, home / "ck")
    shutil.copy(converted.parent / "picture.png", home / "picture.png")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    assert main(["generate", "ck", "--prompt", "hi", *FAST]) == 0
    assert main(["generate", "~/ck", "--prompt", "What is it?", "--image", "~/picture.png", *FAST]) == 0
    capsys.readouterr()

    calls = []

    def spy(model, prompts, **kwargs):
        calls.append(prompts[0])
        return generate(model, prompts, **kwargs)

    generate = kimi_jax.generate
    monkeypatch.setattr(kimi_jax, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("/image ~/picture.png\nWhat is it?\n"))
    assert main(["chat", "~/ck", *FAST]) == 0
    assert f"attached {home / 'picture.png'}" in capsys.readouterr().out
    assert calls[0][0]["content"][0] == {"type": "image", "image": str(home / "picture.png")}


# ------------------------------------------------------------------ chat


def _chat(monkeypatch, script: str):
    """Runs ``generate`` for real, recording each conversation that got a reply."""
    calls = []

    def spy(model, prompts, **kwargs):
        text = json.dumps(prompts[0])
        if "fail with a ValueError" in text:
            raise ValueError("prompt 0 holds 1 image or video placeholder(s), but its parts give 0 media for it")
        if "fail with a bug" in text:
            raise TypeError("unhashable type: 'list'")
        results = generate(model, prompts, **kwargs)
        calls.append([m["content"] for m in prompts[0]])
        return results

    generate = kimi_jax.generate
    monkeypatch.setattr(kimi_jax, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    return calls


def test_chat_survives_turn_errors(demo, capsys, monkeypatch):
    converted, _ = demo
    calls = _chat(monkeypatch, "Hi\nfail with a ValueError\n/image nowhere.png\n/image\n"
                               "fail with a bug\nAnd then?\n/exit\n")
    assert main(["chat", str(converted), "--system", "Be brief.", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 7
    assert "error: prompt 0 holds 1 image or video placeholder(s)" in out
    assert "error: cannot read image 'nowhere.png'" in out and "error: usage: /image PATH" in out
    assert "error: TypeError: unhashable type: 'list' (run with --debug for the traceback)" in out
    # the failed messages were not kept; the turns before them were
    assert calls[0] == ["Be brief.", "Hi"]
    assert calls[1][:2] == ["Be brief.", "Hi"] and calls[1][3] == "And then?" and len(calls[1]) == 4


def test_chat_drops_the_oldest_turns_when_the_context_is_full(demo, tmp_path, capsys, monkeypatch):
    small = _copy(demo, tmp_path, "small")
    config = json.loads((small / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 110
    (small / "config.json").write_text(json.dumps(config))
    # with the system message: the first message takes ~97 tokens, the second and third ~65 with a reply
    first = ("Hi there, tell me all about the weather in the mountains today, and tomorrow, and the day after "
             "that too, please")
    second, third = "And then?", "Third"
    huge = "x " * 100
    calls = _chat(monkeypatch, f"{first}\n{second}\n{huge}\n{third}\n")
    assert main(["chat", str(small), "--system", "Be brief.", *FAST]) == 0
    out = capsys.readouterr().out
    assert calls[0] == ["Be brief.", first]
    assert calls[1] == ["Be brief.", second]  # the first turn was dropped, the system message kept
    assert out.count("[note: dropped the 1 oldest turn(s) to fit the model's context]") == 1
    assert "error: message refused, it does not fit even without the earlier turns" in out  # the huge one
    assert calls[2][:2] == ["Be brief.", second] and calls[2][-1] == third  # the refusal dropped nothing
    assert len(calls) == 3 and out.count("you> ") == 5


def test_chat_help_states_the_context_policy(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "outgrows the model's context loses its oldest turns (the system message stays)" in help_text
