"""Where the converter writes: checks on the destination, its temporary folders, the final swap.

Rules (``convert(..., overwrite=True)`` / ``--overwrite``):

- the destination is never the source folder, inside it, or a folder the source is inside
  (compared after resolving symlinks), and never a file;
- ``overwrite`` replaces only a kimi-jax checkpoint (a folder with the converter's
  ``kimi_jax.json`` and ``params/``, holding only files the converter writes) or an empty
  folder; any other folder is refused;
- the new checkpoint is completed in a temporary folder beside the destination
  (``.DST.tmp-XXXXXXXX``), then swapped in: the old checkpoint is renamed aside
  (``.DST.old-XXXXXXXX``), the new one renamed in, and only then the old one removed;
- the temporary folders hold a marker file (:data:`MARKER`, with the writer's pid, host and
  start time). A conversion killed hard leaves its folder behind; the next conversion into the
  same destination removes such marked folders (and nothing else), saying so.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

INFO_FILE = "kimi_jax.json"
PARAMS_DIR = "params"
MARKER = ".kimi-jax-partial"
"""Marks a folder the converter is writing (or was, if it was killed): removable leftovers."""
LEFTOVER_KINDS = ("tmp", "old")


def absolute(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute and symlinks resolved (Orbax needs absolute paths)."""
    return Path(path).expanduser().resolve()


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a kimi-jax checkpoint: the converter's ``kimi_jax.json`` (with its
    format fields) and ``params/``."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(info, dict) and isinstance(info.get("format_version"), int)
            and isinstance(info.get("dtype"), str) and (folder / PARAMS_DIR).is_dir())


def check(src: Path, dst: Path, *, overwrite: bool, converter_files: set[str]) -> None:
    """Raises a clear error when the converter must not write to ``dst`` (both paths absolute)."""
    if dst == src:
        raise ValueError(f"the destination {dst} is the source folder itself; choose another destination")
    if dst.is_relative_to(src):
        raise ValueError(f"the destination {dst} is inside the source folder {src}; choose a destination outside it")
    if src.is_relative_to(dst):
        raise ValueError(f"the source folder {src} is inside the destination {dst}; replacing {dst} would delete "
                         "the source: choose another destination")
    for parent in (dst, *dst.parents):
        if parent.exists() or parent.is_symlink():
            if parent == dst and not parent.is_dir():
                raise FileExistsError(f"the destination {dst} is a file, not a folder; choose another destination")
            if not parent.is_dir():
                raise FileExistsError(f"{parent} is a file, so no folder {dst} can be made under it; "
                                      "choose another destination")
            break
    if not dst.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    entries = sorted(p.name for p in dst.iterdir())
    if not entries:
        return
    if not is_checkpoint(dst):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise FileExistsError(
            f"{dst} is not a kimi-jax checkpoint (no {INFO_FILE} from the converter), so --overwrite will not "
            f"replace it: it holds {shown}; choose another destination"
        )
    foreign = [e for e in entries if e not in converter_files]
    if foreign:
        raise FileExistsError(
            f"{dst} is a kimi-jax checkpoint but also holds files the converter did not write "
            f"({', '.join(foreign[:5])}), which --overwrite would delete; move them out or choose another destination"
        )


def check_writable(dst: Path) -> None:
    """Fails early, naming the folder, when ``dst``'s nearest existing folder cannot be written."""
    parent = next((p for p in dst.parents if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {parent} (permission denied), so cannot create {dst}")


def _writing_error(error: OSError, folder: Path) -> OSError:
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "read-only file system" if error.errno == errno.EROFS else "permission denied"
        return PermissionError(error.errno, f"cannot write to {folder} ({reason})")
    return error


def _leftovers(dst: Path) -> list[Path]:
    prefixes = tuple(f".{dst.name}.{kind}-" for kind in LEFTOVER_KINDS)
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink()
                  and (p / MARKER).is_file())


def _running(marker: Path) -> str | None:
    """Who may still be writing the folder of ``marker``: a live conversion on this host, or
    one on another host (a shared file system: it cannot be checked from here); None if none."""
    try:
        info = json.loads(marker.read_text())
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return f"a conversion on host {host} (pid {pid}); remove the folder by hand if it has ended"
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return f"a conversion (pid {pid}) is still writing it"


def remove_leftovers(dst: Path) -> None:
    """Removes the marked folders unfinished conversions into ``dst`` left beside it, saying so."""
    for folder in _leftovers(dst):
        writer = _running(folder / MARKER)
        if writer is not None:
            print(f"kimi-jax: leaving {folder}: {writer}", file=sys.stderr)
            continue
        if folder.name.startswith(f".{dst.name}.old-") and not dst.exists():
            # a swap interrupted between its two renames: the old checkpoint is the only one
            os.rename(folder, dst)
            (dst / MARKER).unlink(missing_ok=True)
            print(f"kimi-jax: restored {dst} from {folder}, left aside by an interrupted replacement", file=sys.stderr)
            continue
        print(f"kimi-jax: removing an unfinished conversion left at {folder}", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)


def mark(folder: Path, dst: Path) -> None:
    (folder / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "time": time.time(), "destination": str(dst)}))


def make_temporary(dst: Path) -> Path:
    """A new marked folder beside ``dst`` to write the checkpoint into."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise _writing_error(e, dst.parent) from None
    try:
        mark(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def swap_in(tmp: Path, dst: Path) -> None:
    """Puts the completed checkpoint ``tmp`` at ``dst``: an existing ``dst`` is marked and
    renamed aside first, and removed only once the new one is in place (restored if that fails)."""
    old = None
    try:
        if dst.exists():
            mark(dst, dst)
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            if old is not None:
                os.rename(old, dst)
                (dst / MARKER).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise _writing_error(e, dst.parent) from None
    (dst / MARKER).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
