"""A whole training run from a :class:`~kimi_jax.train.config.TrainConfig`: the model
(random in the demo's tiny K2.5 shape, or a converted checkpoint), the data, the loop, and
the result written in the official Hugging Face layout and converted, so ``kimi_jax.load``,
``generate`` and the CLI take it.

``OUT/hf/`` holds the exported checkpoint with its tokenizer, ``OUT/model/`` the converted
one, ``OUT/metrics.jsonl`` the logged steps and ``OUT/state/`` the train state to resume from.
"""

from __future__ import annotations

import random
from pathlib import Path

import jax.numpy as jnp

from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.train.config import TrainConfig

HF_DIR, MODEL_DIR = "hf", "model"


def calculator_batches(tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int):
    """``batch_at(step)`` for the calculator recipe: fresh questions each step (never the
    held-out ones), half of each batch in Thinking mode, half in Instant mode."""
    from kimi_jax.train import calculator
    from kimi_jax.train.data import encode_conversation, make_batch

    exclude = {q.text for q in calculator.held_out()}

    def batch_at(step: int) -> dict:
        rng = random.Random(seed * 1_000_003 + step)
        examples = [
            encode_conversation(tokenizer, calculator.conversation(q, thinking=i % 2 == 0), tools=calculator.TOOLS,
                                thinking=i % 2 == 0)
            for i, q in enumerate(calculator.training_questions(rng, batch_size, exclude))
        ]
        return make_batch(examples, seq_len, tokenizer.im_end_id)

    return batch_at


def build_model(cfg: TrainConfig, tokenizer_dir: Path, mesh=None):
    """The model to train and the folder of its tokenizer: the ``init`` checkpoint, or a random
    model of the demo's K2.5 shape with ``[model]`` sizes (its tokenizer written to ``tokenizer_dir``)."""
    import kimi_jax
    from kimi_jax.parallel.placement import Parallel
    from kimi_jax.testing.demo import write_tokenizer
    from kimi_jax.testing.models import random_model
    from kimi_jax.testing.synthetic import TINY_TEXT, TINY_VISION, k25_config

    dtype = jnp.dtype(cfg.train.dtype)
    if cfg.init is not None:
        return kimi_jax.load(cfg.init, dtype=dtype, mesh=mesh), Path(cfg.init).expanduser()
    config = kimi_jax.KimiConfig.from_dict(k25_config(dict(TINY_TEXT, **cfg.model), TINY_VISION))
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tokenizer_dir, config.text.vocab_size)
    parallel = None if mesh is None else Parallel.create(mesh)
    model = random_model(config, dtype=dtype, expert_format="dense", parallel=parallel, seed=cfg.train.seed)
    return model, tokenizer_dir


def train(cfg: TrainConfig, out: str | Path, *, steps: int | None = None, mesh=None, progress: bool = True,
          save_every: int | None = None) -> Path:
    """Runs ``cfg`` (``steps`` overrides its step count) into ``out``, resuming a run found
    there; returns the converted checkpoint's folder."""
    import kimi_jax
    from kimi_jax.train.export import export_hf
    from kimi_jax.train.loop import fit
    from kimi_jax.train.step import Trainer

    out = Path(out).expanduser().resolve()
    loop = cfg.train
    steps = loop.steps if steps is None else steps
    model, tokenizer_dir = build_model(cfg, out / HF_DIR, mesh)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    batch_at = calculator_batches(tokenizer, loop.batch_size, loop.seq_len, loop.seed)
    trainer = Trainer(model, cfg.optimizer, cfg.step, lora=loop.lora, seed=loop.seed)
    fit(trainer, batch_at, steps, out=out, log_every=loop.log_every,
        save_every=loop.save_every if save_every is None else save_every, progress=progress)
    export_hf(trainer.merged_model(), out / HF_DIR, dtype="bfloat16", tokenizer=tokenizer_dir)
    return kimi_jax.convert(out / HF_DIR, out / MODEL_DIR, dtype=loop.dtype, overwrite=True, progress=False)
