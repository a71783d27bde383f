"""``kimi-jax bench moe`` on the CPU: refused without ``--allow-cpu``; with it, a tiny layer
whose rows are appended to the results file as JSON lines."""

import json

import jax

from kimi_jax.cli.main import main

TINY = ["--experts", "8", "--hidden", "32", "--moe-hidden", "32", "--copy-bytes", "65536", "--matmul-size", "32",
        "--iters", "1", "--impls", "grouped-xla", "--bf16-backends", "xla"]
REQUIRED = {"tokens", "experts", "impl", "ms", "bytes", "bw_ratio", "gpu", "date"}


def test_refused_without_an_accelerator(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    out = tmp_path / "moe.jsonl"
    assert main(["bench", "moe", "--tokens", "1", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kimi-jax bench: error: no GPU or TPU found"), err
    assert "--allow-cpu" in err
    assert not out.exists()


def test_tiny_run_appends_rows_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "new" / "moe.jsonl"
    out.parent.mkdir()
    earlier = '{"earlier": "row"}\n'
    out.write_text(earlier)
    assert main(["bench", "moe", "--allow-cpu", "--tokens", "1", "2", *TINY, "--out", str(out), "--table"]) == 0
    text = out.read_text()
    assert text.startswith(earlier)
    rows = [json.loads(line) for line in text.splitlines()[1:]]
    assert [(r["tokens"], r["experts"], r["impl"]) for r in rows] == [
        (1, "int4", "grouped-xla"), (2, "int4", "grouped-xla"), (1, "bf16", "grouped"), (2, "bf16", "grouped")]
    for r in rows:
        assert REQUIRED <= r.keys() and r["gpu"] == "cpu" and r["ms"] > 0 and r["bw_ratio"] > 0
        assert (r["routed_experts"], r["hidden_size"], r["moe_hidden_size"]) == (8, 32, 32)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and table[2].startswith("| 1 | int4 | grouped-xla | auto | ")
