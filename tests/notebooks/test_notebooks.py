"""Every notebook in notebooks/ runs top to bottom in a fresh kernel started in its folder, draws
its plots, and is committed without outputs."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import matplotlib.image
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

FOLDER = Path(__file__).parents[2] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
# Notebooks render figures with matplotlib's inline backend (drawn by Agg, no display needed), so
# the figures come back as PNG outputs; a backend chosen by the environment would swallow them.
BACKEND = "module://matplotlib_inline.backend_inline"


def test_the_notebooks_are_there():
    assert [p.stem[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    assert len(NOTEBOOKS) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_plots(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # A kernel on this interpreter, whatever kernels the machine has installed.
    write_kernel_spec(tmp_path / "kernels" / "kimi-jax")
    kernel = KernelManager(kernel_name="kimi-jax", kernel_spec_manager=KernelSpecManager(
        kernel_dirs=[str(tmp_path / "kernels")]))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each notebook sets its own devices
    env.update(MPLBACKEND=BACKEND, JAX_PLATFORMS="cpu")
    client = NotebookClient(nb, km=kernel, timeout=300, resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)
    figures = [
        output["data"]["image/png"]
        for cell in nb.cells if cell.cell_type == "code"
        for output in cell.outputs if "image/png" in output.get("data", {})
    ]
    drawn = sum(cell.source.count("plt.show()") for cell in nb.cells if cell.cell_type == "code")
    assert len(figures) == drawn > 0, f"{path.name}: {drawn} figures shown, {len(figures)} came back"
    for i, figure in enumerate(figures):
        png = tmp_path / f"figure-{i}.png"
        png.write_bytes(base64.b64decode(figure))
        assert matplotlib.image.imread(png).std() > 0, f"{path.name}: figure {i} is blank"
