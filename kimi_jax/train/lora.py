"""LoRA adapters on the attention and the shared / dense MLP weights.

An adapted weight ``W`` (stored ``[in..., out...]``) is used as ``W + (alpha / rank) * A @ B``
with ``A`` [in, rank] (random) and ``B`` [rank, out] (zeros, so training starts from the
model itself); the decoder layers' weights are stacked over the layers of a run, and so are
their adapters ([layers, in, rank], [layers, rank, out]). The model is never modified: :meth:`LoRA.apply` returns a model whose adapted
weights are those sums, inside the traced step, and only ``A`` and ``B`` are trained. The
routed experts (dense or INT4), the router, norms and embeddings stay frozen.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def lora_targets(model) -> dict[tuple, tuple[int, int]]:
    """Paths of the weights LoRA adapts (attention, dense MLP, shared experts) -> (number of
    leading layer axes, number of input axes after them)."""
    targets = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path[-1]
        in_attention = "self_attn" in path and name in ATTENTION
        in_mlp = name in MLP and "experts" not in path and "language_model" in path
        if in_attention or in_mlp:
            targets[path] = (1 if "runs" in path else 0, 2 if name == "o_proj" else 1)
    return targets


class LoRA(nnx.Module):
    """Adapters for ``model``'s :func:`lora_targets`: ``rank`` and ``alpha`` as in the LoRA paper."""

    def __init__(self, model, *, rank: int = 8, alpha: float = 16.0, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.scale = alpha / rank
        self.paths = tuple(lora_targets(model).items())
        flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        a, b = [], []
        for path, (lead, n_in) in self.paths:
            var = flat[path]
            layers, shape = var.shape[:lead], var.shape[lead:]
            d_in, d_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
            init = jax.random.normal(rngs.params(), (*layers, d_in, rank), jnp.float32) / math.sqrt(d_in)
            axes = (None,) * (lead + 2)  # small: replicated
            a.append(nnx.Param(init.astype(var.dtype), axes=axes))
            b.append(nnx.Param(jnp.zeros((*layers, rank, d_out), var.dtype), axes=axes))
        self.a = nnx.List(a)
        self.b = nnx.List(b)

    def apply(self, model):
        """A model with every adapted weight replaced by ``W + scale * A @ B`` (the input is unchanged)."""
        graphdef, state = nnx.split(model)
        # Fresh variables throughout, so the returned model belongs wholly to this trace (the
        # model's own variables were made outside it).
        flat = {path: var.replace(var.get_raw_value()) for path, var in nnx.to_flat_state(state)}
        for (path, _), a, b in zip(self.paths, self.a, self.b, strict=True):
            var = flat[path]
            delta = (self.scale * (a[...] @ b[...])).reshape(var.shape)
            flat[path] = var.replace(var[...] + delta.astype(var.dtype))
        return nnx.merge(graphdef, nnx.State.from_flat_path(flat))
