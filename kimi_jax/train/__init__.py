"""Training on optax: the masked next-token loss, a compiled and sharded train step with
AdamW or Muon (QK-clip optional), DeepSeek-V3's auxiliary-loss-free expert balancing and
sequence-wise balance loss, gradient checkpointing, LoRA, Orbax train-state checkpoints,
the loop, export to the Hugging Face layout, and the ``calculator`` recipe."""

from kimi_jax.train.config import TrainConfig, load_config
from kimi_jax.train.data import Example, encode_conversation, make_batch
from kimi_jax.train.export import export_hf
from kimi_jax.train.loop import fit
from kimi_jax.train.optim import OptimizerConfig
from kimi_jax.train.step import StepConfig, Trainer

__all__ = [
    "Example", "OptimizerConfig", "StepConfig", "TrainConfig", "Trainer", "encode_conversation", "export_hf", "fit",
    "load_config", "make_batch",
]
