"""The built-in file and Python tools stay inside their limits."""

import os
import time

import pytest

from kimi_jax.agents import file_tools, python_tool, run_python


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello\nworld\n")
    (root / "sub" / "long.txt").write_text("x" * 50)
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    return root


def test_files_read_and_list(folder):
    read, listing = file_tools(folder, max_chars=20)
    assert read(path="a.txt") == "hello\nworld\n"
    assert listing() == "a.txt\nlink.txt\nsub/" and listing(path="sub") == "long.txt"
    assert read(path="sub/long.txt", offset=40) == "x" * 10
    assert read(path="sub/long.txt").endswith("[... 30 more characters; read on with offset=20]")


@pytest.mark.parametrize("path, error", [
    ("../secret.txt", PermissionError), ("link.txt", PermissionError), ("sub/../../secret.txt", PermissionError),
    ("/etc/passwd", ValueError), ("missing.txt", FileNotFoundError), ("sub", IsADirectoryError),
])
def test_files_stay_in_the_folder(folder, path, error):
    read, _ = file_tools(folder)
    with pytest.raises(error):
        read(path=path)


def test_files_need_a_folder(tmp_path):
    with pytest.raises(NotADirectoryError):
        file_tools(tmp_path / "nope")


def test_python_runs_and_reports():
    tool = python_tool(timeout_s=5)
    assert tool(code="print(6 * 7)") == "[stdout]\n42\n"
    out = tool(code="raise SystemExit(3)")
    assert out == "[exit status 3]"
    assert "ZeroDivisionError" in tool(code="1/0") and "[exit status 1]" in tool(code="1/0")


@pytest.mark.parametrize("code", [
    "import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)",
    "import urllib.request; urllib.request.urlopen('http://example.com', timeout=2)",
    "import socket; socket.socket(socket.AF_UNIX)",
    "import subprocess; subprocess.run(['true'])",
    "import os; os.system('true')",
])
def test_python_has_no_network_and_no_processes(code):
    out = run_python(code, timeout_s=10)
    assert "the sandbox refuses" in out and "[exit status 1]" in out


def test_python_time_and_memory_limits():
    start = time.perf_counter()
    assert run_python("while True: pass", timeout_s=1) == "[killed: ran past the time limit of 1 s]"
    assert time.perf_counter() - start < 5
    out = run_python("x = bytearray(1 << 30)", memory_mb=256)
    assert "MemoryError" in out and "256 MB memory limit" in out


def test_python_leaves_no_files(tmp_path):
    out = run_python("import os; open('f.txt', 'w').write('x'); print(os.getcwd())")
    workdir = out.split("\n")[1]
    assert not os.path.exists(workdir)
