"""The training loop: steps over a batch source, a progress bar with loss and tokens/s,
metrics as JSON lines, periodic train-state checkpoints and resuming from the latest one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from kimi_jax.train.checkpoint import latest_step, restore_state, save_state
from kimi_jax.train.step import Trainer

METRICS_FILE = "metrics.jsonl"


def fit(
    trainer: Trainer, batch_at: Callable[[int], dict], steps: int, *, out: str | Path | None = None,
    log_every: int = 10, save_every: int = 0, resume: bool = True, progress: bool = True,
) -> list[dict]:
    """Trains until ``trainer`` has done ``steps`` steps; returns the logged metrics.

    ``batch_at(step)`` gives the batch of a step (a function of the step, so a resumed run
    sees the same batches as an uninterrupted one). With ``out``: resumes from the latest
    train state saved there (``resume``), appends one JSON line per logged step to
    ``out/metrics.jsonl`` (``step``, ``loss``, the other step metrics, ``tokens_per_s``,
    ``elapsed_s``) and saves the train state every ``save_every`` steps (0: only at the end).
    """
    if steps < 0 or log_every < 1 or save_every < 0:
        raise ValueError("steps and save_every must be >= 0, log_every >= 1")
    out = None if out is None else Path(out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and latest_step(out) is not None:
            restore_state(trainer, out)
    logged = []
    start, tokens, t0 = trainer.steps_done, 0, time.perf_counter()
    with tqdm(total=steps, initial=start, desc="training", disable=not progress, unit="step") as bar:
        while trainer.steps_done < steps:
            batch = batch_at(trainer.steps_done)
            metrics = trainer.step(batch)
            tokens += int(batch["valid"].sum())
            step = trainer.steps_done
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens / elapsed:.0f}")
            if step % log_every == 0 or step == steps:
                record = {"step": step, **metrics, "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed}
                logged.append(record)
                if out is not None:
                    with open(out / METRICS_FILE, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if out is not None and save_every and step % save_every == 0 and step < steps:
                save_state(trainer, out)
    if out is not None and trainer.steps_done > start:
        save_state(trainer, out)
    return logged
