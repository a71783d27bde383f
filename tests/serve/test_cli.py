"""``kimi-jax serve``: options reach the app; bad options are one-line errors."""

import pytest

from kimi_jax.cli.main import main


def test_serve_builds_the_app(checkpoint, monkeypatch):
    seen = {}

    def run(app, host, port, log_level):
        server = app.state.server
        seen.update(host=host, port=port, name=server.name, slots=server.worker.engine.max_slots,
                    length=server.max_length, alive=server.worker.alive)

    monkeypatch.setattr("uvicorn.run", run)
    assert main(["serve", str(checkpoint), "--port", "8123", "--max-slots", "2", "--max-length", "256",
                 "--served-model-name", "tiny", "--dtype", "float32"]) == 0
    assert seen == {"host": "127.0.0.1", "port": 8123, "name": "tiny", "slots": 2, "length": 256, "alive": True}


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "must be a port in [1, 65535]"),
    (["--max-slots", "0"], "must be >= 1"),
])
def test_bad_options(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit):
        main(["serve", str(checkpoint), *args])
    assert message in capsys.readouterr().err


def test_context_too_long(checkpoint, capsys):
    assert main(["serve", str(checkpoint), "--max-length", "100000000"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
