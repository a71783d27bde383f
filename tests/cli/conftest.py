"""The demo's converted checkpoint, written once for the command-line tests."""

import io

import pytest

from kimi_jax.cli.main import main


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """``kimi-jax demo``'s folder: (the converted checkpoint, what the demo printed)."""
    work = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        out = io.StringIO()
        mp.setattr("sys.stdout", out)
        assert main(["demo", "--dir", str(work)]) == 0
    return work / "converted", out.getvalue()
