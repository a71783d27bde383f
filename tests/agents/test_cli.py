"""``kimi-jax agent`` on a tiny random checkpoint: steps stream, a summary follows, bad options fail early."""

import pytest

import kimi_jax
from kimi_jax.cli.main import main
from kimi_jax.testing.demo import DEMO_VOCAB_SIZE, write_tokenizer
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("agent-cli")
    src = write_checkpoint(work / "hf", k25_config(dict(TINY_TEXT, vocab_size=DEMO_VOCAB_SIZE), multimodal=False),
                           seed=5, dtype="float32")
    write_tokenizer(src, DEMO_VOCAB_SIZE)
    return kimi_jax.convert(src, work / "converted", dtype="float32", progress=False)


@pytest.mark.parametrize("swarm", [False, True])
def test_agent_command_streams_and_summarizes(checkpoint, tmp_path, capsys, swarm):
    argv = ["agent", str(checkpoint), "--task", "What is 2 + 2?", "--tool", "calculator", "--tool", f"files={tmp_path}",
            "--max-steps", "1", "--max-new-tokens", "6", "--temperature", "0", "--max-slots", "2", "--max-length", "2048"]
    assert main(argv + (["--swarm"] if swarm else [])) == 0
    out, err = capsys.readouterr()
    assert f"[{'orchestrator' if swarm else 'agent'} step 0: thinking]" in out
    assert " 1 steps, " in err and "engine steps" in err and ("critical steps" in err) == swarm


@pytest.mark.parametrize("tool, message", [("files=/no/such/folder", "not a folder"), ("shell", "expected calculator")])
def test_bad_tools_fail_before_loading(tool, message, capsys):
    with pytest.raises(SystemExit):
        main(["agent", "/nowhere", "--task", "t", "--tool", tool])
    assert message in capsys.readouterr().err
