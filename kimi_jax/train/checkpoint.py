"""Orbax checkpoints of the whole train state (model, adapters, optimizer moments and step
counters), so a run resumes exactly where it stopped.

``DIR/state/<step>/`` holds one checkpoint per saved step; restoring reads each array
straight into the sharding the :class:`~kimi_jax.train.step.Trainer` gives it (on a mesh,
its part on each device), whatever the sharding it was saved from.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import jax
from orbax.checkpoint import v1 as ocp

from kimi_jax.train.step import Trainer

STATE_DIR = "state"


def _steps(folder: Path) -> list[int]:
    root = folder / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if re.fullmatch(r"\d+", p.name) and p.is_dir())


def latest_step(folder: str | Path) -> int | None:
    """The last step saved under ``folder`` (None if none)."""
    steps = _steps(Path(folder))
    return steps[-1] if steps else None


def save_state(trainer: Trainer, folder: str | Path, *, keep: int = 2) -> Path:
    """Saves the train state as ``folder/state/<step>``; keeps the newest ``keep`` checkpoints."""
    folder = Path(folder)
    path = folder / STATE_DIR / str(trainer.steps_done)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ocp.save_pytree(path, trainer.state)
    for old in _steps(folder)[:-keep] if keep else []:
        shutil.rmtree(folder / STATE_DIR / str(old))
    return path


def restore_state(trainer: Trainer, folder: str | Path, step: int | None = None) -> int:
    """Restores the train state saved at ``step`` (default: the latest) into ``trainer``;
    returns that step. ``FileNotFoundError`` if there is none."""
    folder = Path(folder)
    step = latest_step(folder) if step is None else step
    if step is None or step not in _steps(folder):
        raise FileNotFoundError(f"no train-state checkpoint {'' if step is None else step} under {folder / STATE_DIR}")
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainer.state,
                          trainer.shardings)
    trainer.state = ocp.load_pytree(folder / STATE_DIR / str(step), target)
    trainer.steps_done = step
    return step
