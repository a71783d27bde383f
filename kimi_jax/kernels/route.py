"""The router's choice of experts and their weights in one launch (Pallas' Triton lowering).

For the router's float32 logits [T, E] and its selection-only correction bias [E]
(``n_group == 1``, as K2.5):

    scores = sigmoid(logits)
    idx[t] = top_k(scores[t] + bias, k)       descending; ties to the lower index
    w[t]   = scores[t, idx[t]]                 / (their sum + 1e-20) with ``normalize``
    w[t]  *= factor
    idx[t] = E where not valid[t]              (with ``valid``: idle tokens choose no expert)

The reference is ``kimi_jax.model.moe.select_experts``. The order is ``jax.lax.top_k``'s total
order (-0 below +0, NaN above inf), so the indices are always distinct and in range. XLA takes
five small fusions a MoE layer for this at one token (the rank comparisons, two reductions, the
gather and the normalization: about 7 us on an H100); here one single-warp program per token
takes k rounds of a maximum and the lowest index holding it, among the entries not yet taken.
The weights' sum may round differently from XLA's (a different order of 8 additions), and the
sigmoid is Triton's (``1 / (1 + exp(-x))`` with its exponential), which may differ from XLA's in
the last bit: a choice between two experts whose biased scores tie within that bit may differ.
The sigmoid and the idle-token mask were XLA launches of their own (about 2.5 us a layer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas API; absent in some jax builds.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

_INT_MIN = int(jnp.iinfo(jnp.int32).min)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def route_top_k(logits: jax.Array, bias: jax.Array, k: int, *, normalize: bool, factor: float,
                valid: jax.Array | None = None, layer=None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The combine weights [T, k] (float32) and chosen experts [T, k] (int32) of the router's
    ``logits`` [T, E] (float32) with the correction ``bias`` [E], or row ``layer`` (int32,
    clamped) of a stack ``bias`` [L, E] (read in place); tokens where ``valid`` [T] (bool) is
    False choose expert E, none (see the module docstring). ``interpret=True`` runs the kernel
    body in Pallas' interpreter (CPU tests)."""
    T, E = logits.shape if logits.ndim == 2 else (None, None)
    if logits.ndim != 2 or bias.shape[-1:] != (E,) or bias.ndim != (1 if layer is None else 2):
        raise ValueError(f"route_top_k: logits {logits.shape} must be [T, E] and bias {bias.shape} [E] (or [L, E] "
                         "with a layer)")
    if not 1 <= k <= E:
        raise ValueError(f"route_top_k: k = {k} must be in [1, E = {E}]")
    if logits.dtype != jnp.float32 or bias.dtype != jnp.float32:
        raise ValueError(f"route_top_k: logits {logits.dtype} and bias {bias.dtype} must be float32")
    if valid is not None and jnp.shape(valid) != (T,):
        raise ValueError(f"route_top_k: valid {jnp.shape(valid)} must be [T] = [{T}]")
    if T == 0:
        return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
    live = jnp.ones((T,), bool) if valid is None else jnp.asarray(valid, bool)  # bool: no convert launch
    layer = jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
    return _call(logits, bias.reshape(-1, E), live, layer, k=k, normalize=bool(normalize), factor=float(factor),
                 interpret=interpret)


def _kernel(l_ref, b_ref, v_ref, layer_ref, w_ref, i_ref, *, E: int, k: int, normalize: bool, factor: float):
    t = pl.program_id(0)
    Ep, Kp = _pow2_at_least(E), _pow2_at_least(k)
    e = lax.broadcasted_iota(jnp.int32, (Ep,), 0)
    live = e < E
    scores = jax.nn.sigmoid(plgpu.load(l_ref.at[t, jnp.minimum(e, E - 1)], mask=live, other=0.0))
    layer = jnp.clip(layer_ref[0], 0, b_ref.shape[0] - 1)
    choice = scores + plgpu.load(b_ref.at[layer, jnp.minimum(e, E - 1)], mask=live, other=0.0)
    bits = lax.bitcast_convert_type(choice, jnp.int32)
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # top_k's total order as int32
    j = lax.broadcasted_iota(jnp.int32, (Kp,), 0)
    idx, w = jnp.zeros((Kp,), jnp.int32), jnp.zeros((Kp,), jnp.float32)
    for n in range(k):
        top = jnp.max(jnp.where(live, key, _INT_MIN))
        i = jnp.min(jnp.where(live & (key == top), e, Ep))
        live = live & (e != i)
        idx = jnp.where(j == n, i, idx)
        w = jnp.where(j == n, jnp.sum(jnp.where(e == i, scores, 0.0)), w)
    if normalize:
        w = w / (jnp.sum(w) + 1e-20)
    w_ref[t, :] = w * factor
    i_ref[t, :] = jnp.where(v_ref[t], idx, E)


@functools.partial(jax.jit, static_argnames=("k", "normalize", "factor", "interpret"))
def _call(logits, bias, valid, layer, *, k, normalize, factor, interpret):
    (T, E), Kp = logits.shape, _pow2_at_least(k)
    params = None if interpret else plgpu.CompilerParams(num_warps=1, num_stages=1)
    w, idx = pl.pallas_call(
        functools.partial(_kernel, E=E, k=k, normalize=normalize, factor=factor),
        out_shape=(jax.ShapeDtypeStruct((T, Kp), jnp.float32), jax.ShapeDtypeStruct((T, Kp), jnp.int32)),
        grid=(T,),
        interpret=interpret,
        compiler_params=params,
        name="route_top_k",
    )(logits, bias, valid, layer)
    return (w, idx) if Kp == k else (w[:, :k], idx[:, :k])  # Triton's blocks are powers of two
