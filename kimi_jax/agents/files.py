"""The file tools: :func:`file_tools` gives ``read_file`` and ``list_files`` confined to one
folder. Every path is resolved (symbolic links followed) before it is used, and refused
unless it lies inside the folder."""

from __future__ import annotations

from pathlib import Path

from kimi_jax.agents.tools import Tool, as_tool

MAX_READ_CHARS = 20_000
MAX_LISTED = 500


def _inside(root: Path, path: str) -> Path:
    if not isinstance(path, str):
        raise TypeError(f"path must be a string, got {type(path).__name__}")
    if Path(path).is_absolute():
        raise ValueError(f"{path!r} is absolute; give a path relative to the folder")
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise PermissionError(f"{path!r} is outside the folder")
    if not resolved.exists():
        raise FileNotFoundError(f"{path!r} does not exist")
    return resolved


def file_tools(folder: str | Path, *, max_chars: int = MAX_READ_CHARS) -> list[Tool]:
    """``read_file(path, offset=0)`` and ``list_files(path=".")`` over ``folder`` (which must exist).

    Reads return at most ``max_chars`` characters from ``offset`` and say where the rest
    starts; undecodable bytes are replaced. Absolute paths, paths leading out of the folder
    (``..``, symbolic links) and missing files are errors.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")

    def read_file(path: str, offset: int = 0) -> str:
        """Read a text file of the folder.

        Args:
            path: The file's path, relative to the folder.
            offset: The character to start from (for long files).
        """
        target = _inside(root, path)
        if not target.is_file():
            raise IsADirectoryError(f"{path!r} is a folder; list it with list_files")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        text = target.read_bytes().decode("utf-8", errors="replace")
        piece = text[offset : offset + max_chars]
        if offset + max_chars < len(text):
            piece += f"\n[... {len(text) - offset - max_chars} more characters; read on with offset={offset + max_chars}]"
        return piece

    def list_files(path: str = ".") -> str:
        """List a folder's entries (folders end with '/').

        Args:
            path: The folder to list, relative to the root folder.
        """
        target = _inside(root, path)
        if not target.is_dir():
            raise NotADirectoryError(f"{path!r} is a file; read it with read_file")
        entries = sorted(target.iterdir())
        names = [e.name + ("/" if e.is_dir() else "") for e in entries[:MAX_LISTED]]
        if len(entries) > MAX_LISTED:
            names.append(f"[... {len(entries) - MAX_LISTED} more]")
        return "\n".join(names) or "(empty folder)"

    return [as_tool(read_file), as_tool(list_files)]
