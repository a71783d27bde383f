"""The compiled train step and the :class:`Trainer` that holds the train state.

The train state is one NNX state (model, optional LoRA adapters, optimizer) split from its
graph; the step is a pure function ``(state, batch) -> (state, metrics)`` under ``jax.jit``
with the state donated and its shardings fixed: on a model built with a
:class:`~kimi_jax.parallel.Parallel`, every array (parameters and optimizer moments alike)
is placed by its logical axes with the layout's rules and the batch is split over the data
axes, so data, expert and tensor parallelism come from the model's layout.

Each step: masked next-token loss plus ``balance_loss`` times DeepSeek-V3's sequence-wise
balance loss (summed over MoE layers), gradients of the trained parameters
(the decoder's ``nnx.Param`` or only the LoRA adapters; ``Quantized`` INT4 experts and
the router's ``Buffer`` bias are never trained), the optimizer update, then the
auxiliary-loss-free bias update of every router (``bias_update_rate``; 0 turns it off) and,
with ``qk_clip``, MuonClip's rescaling of heads whose attention logits passed the threshold.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from kimi_jax.model.moe import MoE
from kimi_jax.train.forward import forward
from kimi_jax.train.lora import LoRA
from kimi_jax.train.loss import (
    bias_update,
    expert_load,
    next_token_loss,
    sequence_balance_loss,
)
from kimi_jax.train.optim import OptimizerConfig, make_optimizer, qk_clip

BATCH_KEYS = ("inputs", "targets", "weights", "valid")
TEXT_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")), nnx.Not(nnx.PathContains("mm_projector")))
"""What is trained without LoRA: the decoder's parameters (text batches give the vision
tower and projector no gradient, so they are left out of the optimizer)."""


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a step does besides the loss: ``balance_loss`` (alpha of the sequence-wise
    balance loss), ``bias_update_rate`` (gamma of the bias update), ``remat`` (gradient
    checkpointing per decoder layer), ``qk_clip`` (MuonClip's threshold tau; None: off)."""

    balance_loss: float = 1e-4
    bias_update_rate: float = 1e-3
    remat: bool = False
    qk_clip: float | None = None

    def __post_init__(self):
        if self.balance_loss < 0 or self.bias_update_rate < 0:
            raise ValueError("balance_loss and bias_update_rate must be >= 0")
        if self.qk_clip is not None and self.qk_clip <= 0:
            raise ValueError(f"qk_clip must be a positive threshold, got {self.qk_clip}")


class TrainModules(nnx.Module):
    """Everything a step changes: the model, the LoRA adapters (or None) and the optimizer."""

    def __init__(self, model, lora: LoRA | None, optimizer: nnx.Optimizer):
        self.model, self.lora, self.optimizer = model, lora, optimizer


def _moe_runs(model) -> list[MoE]:
    """The MoE of each run of MoE layers (its weights stacked over the run's layers)."""
    return [run.mlp for run in model.language_model.runs if isinstance(run.mlp, MoE)]


def _train_step(graphdef, cfg: StepConfig, state, batch):
    mods = nnx.merge(graphdef, state)
    model, lora, optimizer = mods.model, mods.lora, mods.optimizer
    text = model.config.text

    def loss_fn(trained):
        run = trained.apply(model) if lora is not None else trained
        out = forward(run.language_model, batch["inputs"], remat=cfg.remat, max_logits=cfg.qk_clip is not None)
        loss, n_tokens = next_token_loss(out.logits, batch["targets"], batch["weights"])
        per_layer = jax.vmap(lambda r: sequence_balance_loss(r, batch["valid"], text.num_experts_per_tok))
        balance = sum((per_layer(r).sum() for r in out.routing), jnp.zeros((), jnp.float32))
        return loss + cfg.balance_loss * balance, (loss, balance, n_tokens, out.routing, out.max_logits)

    trained = lora if lora is not None else model
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TEXT_PARAMS), has_aux=True)
    (_, (loss, balance, n_tokens, routing, max_logits)), grads = grad_fn(trained)
    optimizer.update(trained, grads)
    metrics = {"loss": loss, "balance_loss": balance, "trained_tokens": n_tokens,
               "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))}
    imbalance = []
    for moe, r in zip(_moe_runs(model), routing, strict=True):
        load = jax.vmap(lambda r: expert_load(r, batch["valid"], text.n_routed_experts))(r)  # [L, E]
        imbalance.append((load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)).max())
        if cfg.bias_update_rate:
            bias = moe.gate.e_score_correction_bias
            bias[...] = bias_update(bias[...], load, cfg.bias_update_rate).astype(bias.dtype)
    if imbalance:
        metrics["max_load_ratio"] = jnp.stack(imbalance).max()
    if cfg.qk_clip is not None:
        for run, m in zip(model.language_model.runs, max_logits, strict=True):
            qk_clip(run.self_attn, m, cfg.qk_clip)
        metrics["max_attention_logit"] = jnp.stack([m.max() for m in max_logits]).max()
    return nnx.state(mods), metrics


class Trainer:
    """Trains ``model`` in place of a copy: ``trainer.step(batch)`` -> metrics;
    ``trainer.model`` is the current model (sharing the train state's arrays).

    ``optimizer`` configures the optax optimizer (:class:`~kimi_jax.train.optim.OptimizerConfig`),
    ``step`` the rest of the step (:class:`StepConfig`). ``lora`` (a rank) trains LoRA adapters
    (:class:`~kimi_jax.train.lora.LoRA`) instead of the model; :meth:`merged_model` folds them in.
    The model's layout (``model.parallel``) shards the train state and the batches.
    """

    def __init__(self, model, optimizer: OptimizerConfig | None = None, step: StepConfig | None = None, *,
                 lora: int | None = None, lora_alpha: float = 16.0, seed: int = 0):
        self.config = step or StepConfig()
        self.optimizer_config = optimizer or OptimizerConfig()
        if lora is not None and self.config.qk_clip is not None:
            raise ValueError("qk_clip rescales attention weights, which LoRA keeps frozen; use one or the other")
        self.parallel = model.parallel
        adapters = None if lora is None else LoRA(model, rank=lora, alpha=lora_alpha, rngs=nnx.Rngs(seed))
        trained = adapters if adapters is not None else model
        opt = nnx.Optimizer(trained, make_optimizer(self.optimizer_config), wrt=TEXT_PARAMS)
        self.graphdef, state = nnx.split(TrainModules(model, adapters, opt))
        self.shardings = self._shardings(state)
        # A copy: the step donates the state, and the caller keeps its model.
        self.state = jax.tree.map(
            lambda x, s: jax.device_put(x, s, may_alias=False), state.to_pure_dict(), self.shardings
        )
        step_fn = functools.partial(_train_step, self.graphdef, self.config)
        self._step = jax.jit(
            lambda pure, batch: self._pure_step(step_fn, pure, batch),
            donate_argnums=0, out_shardings=(self.shardings, None),
        )
        self.steps_done = 0

    def _pure_step(self, step_fn, pure, batch):
        state = self._abstract_state()
        nnx.replace_by_pure_dict(state, pure)
        new_state, metrics = step_fn(state, batch)
        return new_state.to_pure_dict(), metrics

    def _abstract_state(self):
        return nnx.state(nnx.merge(self.graphdef, self._template))

    def _shardings(self, state):
        """The sharding of every train-state array: by its logical axes on the model's mesh
        (arrays without axes, e.g. step counters, replicated); one device without a mesh."""
        # Only the shapes: holding the arrays would keep the optimizer's initial state alive
        # beside the train state's copy (32.8 GB more at the K2.5-width benchmark's size).
        self._template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        if self.parallel is None:
            device = SingleDeviceSharding(jax.local_devices()[0])
            return jax.tree.map(lambda _: device, state.to_pure_dict())
        flat = {}
        for path, var in nnx.to_flat_state(state):
            axes = var.get_metadata().get("axes")
            value = var.get_raw_value()
            if not hasattr(value, "shape"):  # optax's MaskedNode: no state for a masked-out parameter
                flat[path] = value
            elif axes is not None and len(axes) == len(var.shape):
                flat[path] = self.parallel.sharding(axes, var.shape)
            else:
                flat[path] = NamedSharding(self.parallel.mesh, PartitionSpec())
        return nnx.State.from_flat_path(flat).to_pure_dict()

    def place_batch(self, batch: dict) -> dict:
        """The batch's arrays on the devices: split over the layout's batch axes on a mesh."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; a batch holds {list(BATCH_KEYS)} ([B, T] arrays)")
        shapes = {k: np.shape(batch[k]) for k in BATCH_KEYS}
        if len({s for s in shapes.values()}) != 1 or len(shapes["inputs"]) != 2:
            raise ValueError(f"batch arrays must all be [B, T], got shapes {shapes}")
        arrays = {"inputs": np.asarray(batch["inputs"], np.int32), "targets": np.asarray(batch["targets"], np.int32),
                  "weights": np.asarray(batch["weights"], np.float32), "valid": np.asarray(batch["valid"], bool)}
        if self.parallel is None:
            return {k: jax.device_put(v, jax.local_devices()[0]) for k, v in arrays.items()}
        return self.parallel.place_batch(arrays)

    def lower(self, batch: dict) -> jax.stages.Lowered:
        """The train step lowered for batches shaped like ``batch``: ``.compile()`` it to compile
        ahead of the first step (which then reuses it) and read XLA's memory plan."""
        return self._step.lower(self.state, self.place_batch(batch))

    def step(self, batch: dict) -> dict[str, float]:
        """One train step on ``batch`` (see ``kimi_jax.train.loss``); returns its metrics as floats."""
        self.state, metrics = self._step(self.state, self.place_batch(batch))
        self.steps_done += 1
        return {k: float(v) for k, v in metrics.items()}

    def modules(self) -> TrainModules:
        state = self._abstract_state()
        nnx.replace_by_pure_dict(state, self.state)
        return nnx.merge(self.graphdef, state)

    @property
    def model(self):
        """The model with the current weights (LoRA adapters not folded in)."""
        return self.modules().model

    def merged_model(self):
        """The model with the LoRA adapters folded into its weights (the model itself without LoRA)."""
        mods = self.modules()
        return mods.model if mods.lora is None else mods.lora.apply(mods.model)
