"""Train configurations: a TOML file (or a packaged recipe, ``recipes/NAME.toml``) naming
the data, the model's sizes, the optimizer, the step and the loop.

```toml
data = "calculator"          # the data source (see DATA)
init = "checkpoints/kimi"    # optional: start from this converted checkpoint, not random weights
[model]                      # text_config keys over the demo's tiny K2.5 config (random init)
hidden_size = 128
[optimizer]                  # OptimizerConfig fields
name = "muon"
[step]                       # StepConfig fields
balance_loss = 1e-4
[train]                      # steps, batch_size, seq_len, seed, log_every, save_every, dtype, lora
steps = 1000
```
"""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from kimi_jax.train.optim import OptimizerConfig
from kimi_jax.train.step import StepConfig

DATA = ("calculator",)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 512
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    dtype: str = "float32"
    lora: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train.dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    data: str
    model: dict[str, Any]
    optimizer: OptimizerConfig
    step: StepConfig
    train: LoopConfig
    init: str | None = None


def recipes() -> dict[str, Path]:
    """The packaged recipes, by name."""
    folder = resources.files("kimi_jax.train") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def _section(d: dict, name: str, cls):
    table = d.get(name, {})
    if not isinstance(table, dict):
        raise ValueError(f"[{name}] must be a table")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise ValueError(f"[{name}]: unknown keys {unknown}; known: {sorted(fields)}")
    return cls(**table)


def load_config(source: str | Path, *, recipe: bool = False) -> TrainConfig:
    """The config of a TOML file, or with ``recipe`` of the packaged recipe of that name."""
    if recipe:
        known = recipes()
        if str(source) not in known:
            raise ValueError(f"no recipe {source!r}; the recipes are {sorted(known)}")
        path = known[str(source)]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"train config {path} does not exist")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"train config {path} is not valid TOML: {e}") from None
    unknown = sorted(set(d) - {"data", "init", "model", "optimizer", "step", "train"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    if d.get("data") not in DATA:
        raise ValueError(f"{path}: data = {d.get('data')!r}; choose from {list(DATA)}")
    model = d.get("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"{path}: [model] must be a table")
    if "init" in d and model:
        raise ValueError(f"{path}: give either init (a checkpoint) or [model] sizes, not both")
    return TrainConfig(path.stem, d["data"], model, _section(d, "optimizer", OptimizerConfig),
                       _section(d, "step", StepConfig), _section(d, "train", LoopConfig), d.get("init"))
