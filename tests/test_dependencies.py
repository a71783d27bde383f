"""pyproject.toml tells the truth: every third-party import is declared, every declared
dependency is imported (the package by the main dependencies, the tests by the test extra)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group()).lower()


def _imports(folder: Path) -> set[str]:
    """Top-level names of the absolute imports in every .py file under ``folder``."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _distributions(folder: Path, own: set[str]) -> set[str]:
    """The installed distributions that provide the third-party modules ``folder`` imports."""
    provided = importlib.metadata.packages_distributions()
    found = set()
    for module in _imports(folder) - set(sys.stdlib_module_names) - own:
        if module not in provided:
            pytest.fail(f"{folder.name}/ imports {module!r}, which no installed distribution provides")
        found.update(_name(d) for d in provided[module])
    return found


MAIN = {_name(r) for r in PROJECT["dependencies"]}
TEST = {_name(r) for r in PROJECT["optional-dependencies"]["test"]}
# Installed beside a declared dependency, not imported by name: the CUDA build of jax is
# chosen by the user; torchvision is what transformers' image processor imports; pytest-xdist
# is the plugin behind the README's ``-n 2``.
IMPORTED_INDIRECTLY = {"torchvision", "pytest-xdist"}


def test_package_imports_are_declared_and_declared_are_imported():
    used = _distributions(ROOT / "kimi_jax", {"kimi_jax"})
    assert used - MAIN == set(), "imported by kimi_jax but not in [project] dependencies"
    assert MAIN - used == set(), "declared in [project] dependencies but never imported by kimi_jax"


def test_test_imports_are_declared_and_declared_are_imported():
    used = _distributions(ROOT / "tests", {"kimi_jax", "conftest", "hf_reference"})
    assert used - MAIN - TEST == set(), "imported by the tests but declared nowhere"
    assert TEST - used - IMPORTED_INDIRECTLY == set(), "in the test extra but never imported by the tests"
