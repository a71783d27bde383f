"""The Python runner tool: code runs in a fresh interpreter (``python -I``) in a temporary
folder, with a wall-time limit, CPU-time and address-space limits (``setrlimit``), and no
network: the child moves into its own user and network namespaces (no interface but a
downed loopback) before the code runs, and an audit hook it cannot remove refuses sockets
(Unix ones too) and new processes, and ``ctypes`` where namespaces are not available."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

from kimi_jax.agents.tools import Tool, as_tool

MAX_OUTPUT_CHARS = 10_000

_BOOTSTRAP = r"""
import os, resource, sys
limit = {memory}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
_REFUSED = ("socket.", "subprocess.", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
            "os.system", "os.unshare", "os.setns", "pty.")
try:
    os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)
except (AttributeError, OSError):
    _REFUSED += ("ctypes.",)  # without a network namespace, foreign calls could reach the network
def _refuse(event, args):
    if event.startswith(_REFUSED):
        raise PermissionError(f"the sandbox refuses {{event}}")
sys.addaudithook(_refuse)
del _refuse, limit
code = sys.stdin.read()
exec(compile(code, "<code>", "exec"), {{"__name__": "__main__"}})
"""


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_chars: int = MAX_OUTPUT_CHARS) -> str:
    """Runs ``code`` in a sandboxed subprocess; returns its standard output and error (each cut
    to ``max_chars``), and how it ended if not normally (exit status, time or memory limit)."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a string, got {type(code).__name__}")
    bootstrap = _BOOTSTRAP.format(memory=int(memory_mb) * 2**20, cpu=max(1, int(timeout_s + 1)))
    with tempfile.TemporaryDirectory(prefix="kimi-jax-python-") as work:
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "PYTHONIOENCODING": "utf-8"}
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", bootstrap], cwd=work, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True, errors="replace",
        )
        try:
            out, err = process.communicate(code, timeout=timeout_s)
            ended = None
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            ended = f"[killed: ran past the time limit of {timeout_s:g} s]"
    parts = []
    for name, text in (("stdout", out), ("stderr", err)):
        if text:
            cut = text[:max_chars] + (f"\n[... {len(text) - max_chars} more characters]" if len(text) > max_chars else "")
            parts.append(f"[{name}]\n{cut}")
    if ended is None and process.returncode:
        if "MemoryError" in err:
            ended = f"[exit status {process.returncode}: ran out of its {memory_mb} MB memory limit]"
        elif process.returncode == -signal.SIGXCPU:
            ended = "[killed: ran past its CPU-time limit]"
        else:
            ended = f"[exit status {process.returncode}]"
    if ended:
        parts.append(ended)
    return "\n".join(parts) or "(no output)"


def python_tool(*, timeout_s: float = 10.0, memory_mb: int = 1024) -> Tool:
    """The ``python`` tool: runs ``code`` with :func:`run_python` under these limits."""
    if not timeout_s > 0 or not memory_mb > 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s} and {memory_mb}")

    def python(code: str) -> str:
        """Run a Python program in a sandbox (no network, no files kept) and return what it printed.

        Args:
            code: The program; print what you want to see.
        """
        return run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)

    return as_tool(python)
