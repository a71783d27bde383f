"""Which JAX operation and source line each kernel of a GPU profile comes from.

XLA names a GPU kernel after the HLO instruction it runs (``input_reduce_fusion.1`` runs as
``input_reduce_fusion_1``), and an optimized module's text keeps each instruction's JAX
operation and the Python frame that created it (``metadata={op_name=... stack_frame_id=N}``
with the module's ``FileNames`` / ``FunctionNames`` / ``FileLocations`` / ``StackFrames``
tables, or ``source_file`` / ``source_line`` in older dumps). :func:`kernel_sources` reads the
modules XLA dumped (``--xla_dump_to=DIR --xla_dump_hlo_as_text``) and answers, for kernel
names from a profile, ``"<operation> @ <file>:<line> (<function>)"``.
"""

from __future__ import annotations

import re
from pathlib import Path

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")


def kernel_name(instruction: str) -> str:
    """The name a GPU kernel of HLO instruction ``instruction`` carries in a profile."""
    return re.sub(r"[.\-]", "_", instruction)


def _fields(text: str) -> dict[str, str]:
    """``a=1 b="x y"`` -> {"a": "1", "b": "x y"}."""
    return {k: v1 if v1 else v2 for k, v1, v2 in re.findall(r'(\w+)=(?:"([^"]*)"|(\S+))', text)}


def module_sources(text: str) -> dict[str, str]:
    """Kernel name -> ``"<operation> @ <file>:<line> (<function>)"`` for the instructions of
    one optimized HLO module's text that carry metadata (the file shortened to its part from
    the package folder on, or its name)."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    sources = {}
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            tables[section] = {}
            continue
        if section is not None:
            row = _TABLE_ROW.match(line)
            if row:
                tables[section][int(row[1])] = row[2]
                continue
            section = None
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        meta = _fields(match[2])
        op = meta.get("op_name", "").rsplit("/", 1)[-1]
        where = _frame(tables, meta)
        if op or where:
            sources[kernel_name(match[1])] = f"{op} @ {where}" if where else op
    return sources


def _frame(tables: dict[str, dict[int, str]], meta: dict[str, str]) -> str:
    if "source_file" in meta:
        return f"{_short(meta['source_file'])}:{meta.get('source_line', '?')}"
    frame = tables.get("StackFrames", {}).get(int(meta.get("stack_frame_id", 0)))
    if frame is None:
        return ""
    location = tables.get("FileLocations", {}).get(int(_fields(frame).get("file_location_id", 0)))
    if location is None:
        return ""
    loc = _fields(location)
    file = tables.get("FileNames", {}).get(int(loc.get("file_name_id", 0)), "?").strip('"')
    function = tables.get("FunctionNames", {}).get(int(loc.get("function_name_id", 0)), "?").strip('"')
    return f"{_short(file)}:{loc.get('line', '?')} ({function})"


def _short(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("kimi_jax", "benchmarks", "jax", "flax"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) - 1:])
    return Path(path).name


def kernel_sources(dump_dir: str | Path, names: list[str], module: str = "") -> dict[str, str]:
    """Sources of the kernels ``names`` (as a profile names them) from the optimized modules
    dumped to ``dump_dir`` whose name contains ``module``: those of the module that explains
    the most of them (a dump may hold several variants of one step). Kernels that no
    instruction names (custom calls such as Pallas kernels, copies) are left out."""
    best: dict[str, str] = {}
    for path in sorted(Path(dump_dir).glob(f"*{module}*after_optimizations.txt")):
        sources = module_sources(path.read_text())
        found = {name: sources[name] for name in names if name in sources}
        if len(found) > len(best):
            best = found
    return best
