"""Feed-forward blocks: the dense SwiGLU MLP, the router and the routed experts.

Einsum letters: T tokens, D model, F hidden, E experts, K chosen experts per token.

The routed experts have two implementations sharing one router:
- ``reference``: every token gathers the weights of its K chosen experts. Obviously right,
  memory-hungry; the yardstick the other path is tested against.
- ``grouped``: token copies sorted by expert, one grouped matmul per projection over the
  contiguous groups (:func:`swiglu_grouped`), unsorted and combined. The production path.
  Dense experts use ``kimi_jax.kernels.grouped.ragged_dot`` (tokamax's kernels on GPUs and
  TPUs, XLA's ``ragged_dot`` elsewhere, chosen when the step is lowered).
  INT4 experts use a fused kernel where the platform has one: the Pallas Triton kernel on
  GPUs (``kimi_jax.kernels.int4_grouped``: int4 values and scales read once, dequantized in
  registers), the Pallas Mosaic kernel on TPUs (``kimi_jax.kernels.int4_grouped_tpu``:
  dequantized in VMEM), XLA elsewhere (dequantize, then that grouped matmul). The platform is
  chosen when the step is lowered (``jax.lax.platform_dependent``), so one traced step
  exports for TPU, GPU and CPU alike. A decode step of one sequence skips the grouping on the
  Triton kernel: its K copies run per row (:func:`swiglu_rows`). ``grouped-pallas`` /
  ``grouped-pallas-tpu`` / ``grouped-xla`` choose explicitly (a kernel off its platform runs
  in Pallas' interpreter: tests). See :func:`int4_kernel`.

The experts' storage format (``EXPERT_FORMATS``):
- ``dense``: :class:`Experts`, float weights ``[E, in, out]`` in the model's dtype;
- ``int4``: :class:`Int4Experts`, the official checkpoint's symmetric INT4 kept on the
  device: per projection ``q``, the checkpoint's words (uint32 ``[E, out, in / 8]``, eight
  4-bit values each, see ``kimi_jax.quant.formats``), and bfloat16 ``scales``
  ``[E, out, in / 32]`` (W = q * scale), 4.5 bits per weight. Weights are dequantized to
  the activations' dtype only where they are used: the reference path dequantizes each
  token's gathered experts; the XLA grouped path dequantizes one projection of the experts
  taking part (all E when the token copies outnumber the experts, otherwise only the ones
  chosen) just before its grouped matmul; the Pallas kernel dequantizes tiles in registers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from kimi_jax.config.model import TextConfig
from kimi_jax.kernels import int4_grouped
from kimi_jax.kernels.grouped import ragged_dot
from kimi_jax.kernels.int4_grouped import int4_grouped_matmul, int4_grouped_matmuls, int4_rows_matmuls
from kimi_jax.kernels.int4_grouped_tpu import int4_grouped_matmul_tpu
from kimi_jax.kernels.route import route_top_k
from kimi_jax.model.layers import Buffer, Quantized, layer_of, project, projections, weight
from kimi_jax.parallel.expert import expert_parallel_moe, group_by_expert
from kimi_jax.parallel.placement import Parallel
from kimi_jax.quant.formats import dequantize, int4_ragged_dot

MOE_IMPLS = ("grouped", "grouped-xla", "grouped-pallas", "grouped-pallas-tpu", "reference")
INT4_KERNELS = {
    "xla": "dequantize in HBM, then the grouped matmul of kimi_jax.kernels.grouped",
    "pallas": "Pallas Triton kernel, kimi_jax.kernels.int4_grouped (GPUs)",
    "pallas-tpu": "Pallas Mosaic kernel, kimi_jax.kernels.int4_grouped_tpu (TPUs)",
}
"""The INT4 grouped matmuls, by the name :func:`int4_kernel` gives them."""
NATIVE_PLATFORMS = {"pallas": ("cuda", "rocm"), "pallas-tpu": ("tpu",)}
"""Where each Pallas kernel runs compiled (elsewhere: in the interpreter; ``xla`` runs anywhere)."""
PLATFORMS = ("tpu", "cuda", "rocm", "cpu")
EXPERT_FORMATS = ("dense", "int4")
INT4_GROUP_SIZE = 32
"""Input columns per scale in the ``int4`` format (Kimi K2.5 / K2-Thinking use 32)."""
RANK_TOP_K_MAX_TOKENS = 64
"""Up to this many tokens (decode steps), the router's top-k counts ranks (:func:`top_k_by_rank`)
rather than sorting; a prefill chunk's comparisons ([T, E, E]) would outgrow a sort."""
ROWS_MAX_TOKENS = 1
"""Up to this many tokens (a decode step of one sequence: its K experts are distinct), INT4
experts on the Triton kernel run per row (:func:`swiglu_rows`): nothing sorted or gathered."""


class MLP(nnx.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))``: the dense layers' MLP and the shared experts."""

    def __init__(self, d_model: int, d_hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.gate_proj = weight(rngs, (d_model, d_hidden), ("embed", "mlp"), dtype)
        self.up_proj = weight(rngs, (d_model, d_hidden), ("embed", "mlp"), dtype)
        self.down_proj = weight(rngs, (d_hidden, d_model), ("mlp", "embed"), dtype)

    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """``layer``: see :func:`~kimi_jax.model.layers.project` (weights passed as a run's stack)."""
        return self.down(*projections(x, (self.gate_proj[...], self.up_proj[...]), layer), layer)

    def down(self, gate: jax.Array, up: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """The rest of the MLP from the gate and up projections: ``down(silu(gate) * up)``."""
        return project("...f,fd->...d", jax.nn.silu(gate) * up, self.down_proj[...], layer)


class Router(nnx.Module):
    """Sigmoid router with a selection-only correction bias and group-limited top-k."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = weight(rngs, (cfg.hidden_size, E), ("embed", "router"), dtype)
        self.e_score_correction_bias = weight(rngs, (E,), ("router",), jnp.float32, init="zeros", kind=Buffer)

    def __call__(self, x: jax.Array, layer: jax.Array | None = None,
                 valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Routes tokens ``x`` [T, D] (``layer``: see :func:`~kimi_jax.model.layers.project`).

        Returns the combine weights [T, K] (float32), the chosen experts [T, K] (int32) and
        the sigmoid scores [T, E] (float32). The logits are float32 products of float32
        inputs, as the reference. Tokens where ``valid`` [T] (bool; None: all) is False choose
        expert E, that is none.
        """
        return self.route(project("td,de->te", x, self.weight[...], layer, out_dtype=jnp.float32), valid, layer)

    def route(self, logits: jax.Array, valid: jax.Array | None = None,
              layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """:meth:`__call__` from the float32 logits [T, E]. When the step reads the weights in
        place (a run's stack, layer ``layer`` of it: one device), on NVIDIA GPUs the sigmoid,
        the choice, the weights and the idle tokens' mask are one kernel's
        (``kimi_jax.kernels.route``; ``n_group == 1``, as K2.5)."""
        scores = jax.nn.sigmoid(logits)
        bias, cfg = self.e_score_correction_bias[...], self.cfg

        def xla(logits, bias, valid, layer):
            bias = bias if bias.ndim == 1 else layer_of(bias, layer)
            weights, idx = select_experts(jax.nn.sigmoid(logits), bias, cfg)
            return weights, idx if valid is None else jnp.where(valid[:, None], idx, cfg.n_routed_experts)

        if bias.ndim == 1 or cfg.n_group > 1:
            return (*xla(logits, bias, valid, layer), scores)

        def kernel(logits, bias, valid, layer):
            return route_top_k(logits, bias, cfg.num_experts_per_tok, normalize=cfg.norm_topk_prob,
                               factor=cfg.routed_scaling_factor, valid=valid, layer=layer)

        weights, idx = jax.lax.platform_dependent(logits, bias, valid, layer, cuda=kernel, default=xla)
        return weights, idx, scores


def top_k_by_rank(values: jax.Array, k: int) -> jax.Array:
    """The indices of ``jax.lax.top_k(values, k)`` [..., k] (float ``values`` [..., E]; ties to
    the lower index) by counting instead of sorting: entry i's rank is the number of entries
    ahead of it, and the j-th index is the entry of rank j: a reduction over an [..., E, E]
    comparison and one over [..., k, E]. For one token's 384 experts on an H100 the step's
    three fusions took 4.4 us where the sort took 5.4 (``benchmarks/RESULTS.md``). The order
    is total (NaNs included), so the indices are always distinct and in range."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # top_k's total order as int32: -0 < +0, NaN past inf
    e = values.shape[-1]
    i = jnp.arange(e, dtype=jnp.int32)
    ahead = (key[..., None, :] > key[..., :, None]) | ((key[..., None, :] == key[..., :, None]) & (i < i[:, None]))
    rank = jnp.sum(ahead, axis=-1, dtype=jnp.int32)  # [..., E]
    return jnp.sum(jnp.where(rank[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None], i, 0), axis=-1,
                   dtype=jnp.int32)


def select_experts(scores: jax.Array, bias: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """Group-limited top-k on ``scores + bias``; weights from the unbiased scores [T, E]."""
    choice = scores + bias
    G = cfg.n_group
    if G > 1:
        T, E = choice.shape
        grouped = choice.reshape(T, G, E // G)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        kept = jax.lax.top_k(group_score, cfg.topk_group)[1]
        group_mask = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], kept].set(True)
        choice = jnp.where(jnp.repeat(group_mask, E // G, axis=1), choice, -jnp.inf)
    k = cfg.num_experts_per_tok
    idx = top_k_by_rank(choice, k) if choice[..., 0].size <= RANK_TOP_K_MAX_TOKENS else jax.lax.top_k(choice, k)[1]
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights, stacked over experts: ``[E, in, out]``."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts = E
        self.gate_proj = weight(rngs, (E, D, F), ("expert", "embed", "expert_mlp"), dtype)
        self.up_proj = weight(rngs, (E, D, F), ("expert", "embed", "expert_mlp"), dtype)
        self.down_proj = weight(rngs, (E, F, D), ("expert", "expert_mlp", "embed"), dtype)


class Int4Weight(nnx.Module):
    """One projection of every expert in INT4: ``q`` uint32 words ``[E, out, in / 8]``, ``scales``
    bf16 ``[E, out, in / 32]``; W = q * scale (the checkpoint's orientation, PyTorch ``[out, in]``).
    The words' axis carries the input axis' name (it splits like it: 8 inputs per word).

    Random init: q uniform on [-8, 7] and one scale, so W has standard deviation ``std``.
    """

    def __init__(self, n_experts: int, d_out: int, d_in: int, axes: tuple[str, str, str], *,
                 rngs: nnx.Rngs, std: float = 0.02):
        if d_in % INT4_GROUP_SIZE:
            raise ValueError(f"int4 experts: in-features {d_in} is not a multiple of {INT4_GROUP_SIZE}")
        q = jax.random.bits(rngs.params(), (n_experts, d_out, d_in // 8), jnp.uint32)  # 8 uniform int4 values a word
        q_std = math.sqrt((16**2 - 1) / 12)  # of the uniform distribution on [-8, 7]
        self.q = Quantized(q, axes=axes)
        # One scale per group of 32 inputs: the input axis becomes "<name>_groups".
        self.scales = Quantized(
            jnp.full((n_experts, d_out, d_in // INT4_GROUP_SIZE), std / q_std, jnp.bfloat16),
            axes=(*axes[:2], f"{axes[2]}_groups"),
        )

    def gathered(self, idx: jax.Array, dtype: jnp.dtype, layer: jax.Array | None = None) -> jax.Array:
        """The weights of experts ``idx`` [...] dequantized to ``dtype``: [..., in, out] (of layer
        ``layer`` when the weights are a run's stack)."""
        q, scales = self.q[...], self.scales[...]
        if layer is not None:
            q, scales = q[layer], scales[layer]
        w = dequantize(q[idx], scales[idx], INT4_GROUP_SIZE, dtype)
        return jnp.swapaxes(w, -1, -2)


class Int4Experts(nnx.Module):
    """The routed experts' SwiGLU weights in INT4 (see :class:`Int4Weight`)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts = E
        self.gate_proj = Int4Weight(E, F, D, ("expert", "expert_mlp", "embed"), rngs=rngs)
        self.up_proj = Int4Weight(E, F, D, ("expert", "expert_mlp", "embed"), rngs=rngs)
        self.down_proj = Int4Weight(E, D, F, ("expert", "embed", "expert_mlp"), rngs=rngs)


def _gathered(proj: nnx.Param | Int4Weight, idx: jax.Array, dtype: jnp.dtype, layer: jax.Array | None) -> jax.Array:
    """One projection's weights for experts ``idx`` [...] -> [..., in, out]."""
    if isinstance(proj, Int4Weight):
        return proj.gathered(idx, dtype, layer)
    return (proj[...] if layer is None else proj[...][layer])[idx]


def experts_reference(experts: Experts | Int4Experts, x: jax.Array, idx: jax.Array,
                      layer: jax.Array | None = None) -> jax.Array:
    """Each token through its chosen experts, gathering their weights: [T, D] -> [T, K, D]
    (``layer``: which layer of stacked experts)."""
    gate = jnp.einsum("td,tkdf->tkf", x, _gathered(experts.gate_proj, idx, x.dtype, layer))
    up = jnp.einsum("td,tkdf->tkf", x, _gathered(experts.up_proj, idx, x.dtype, layer))
    return jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(gate) * up, _gathered(experts.down_proj, idx, x.dtype, layer))


def grouped_matmul(
    x: jax.Array, proj: nnx.Param | Int4Weight | jax.Array | dict, group_sizes: jax.Array,
    experts: jax.Array | None = None,
) -> jax.Array:
    """Rows of ``x`` [M, I] grouped contiguously by expert, times that expert's weight -> [M, O].

    ``proj`` is a projection of :class:`Experts` / :class:`Int4Experts` or its raw value (an
    array ``[E, I, O]``, or ``{"q", "scales"}`` of the INT4 format). ``group_sizes`` counts
    the rows of each expert in ``experts`` (ids into the stack; all experts in order when None).
    """
    if isinstance(proj, Int4Weight):
        proj = {"q": proj.q[...], "scales": proj.scales[...]}
    elif isinstance(proj, nnx.Variable):
        proj = proj[...]
    if isinstance(proj, dict):
        q, scales = proj["q"], proj["scales"]
        if experts is not None:
            q, scales = q[experts], scales[experts]
        # Tie the dequantization to this layer's activations: otherwise XLA may dequantize
        # every layer's experts up front (they depend on parameters only) and hold them all.
        x, q, scales = jax.lax.optimization_barrier((x, q, scales))
        return int4_ragged_dot(x, q, scales, group_sizes, INT4_GROUP_SIZE)
    w = proj if experts is None else proj[experts]
    return ragged_dot(x, w, group_sizes)


def _experts_in_use(sizes: jax.Array, rows: int) -> tuple[jax.Array, jax.Array | None]:
    """For INT4 experts with fewer rows than experts (decoding): the experts that have rows
    (ascending, like the sorted rows; padded with empty groups) and their group sizes, so
    only those are dequantized. Otherwise ``(sizes, None)``: every expert, in order."""
    if rows >= sizes.shape[0]:
        return sizes, None
    used = jnp.nonzero(sizes, size=rows, fill_value=0)[0]
    return jnp.where(jnp.arange(rows) < jnp.count_nonzero(sizes), sizes[used], 0), used


def int4_kernel(impl: str, platform: str | None = None) -> str:
    """The INT4 grouped matmul a grouped ``impl`` uses (a key of :data:`INT4_KERNELS`).

    ``grouped`` picks by platform: the fused kernel native to it (the Triton kernel on GPUs,
    10-180x faster per projection than XLA's dequantize-then-``ragged_dot`` at K2.5 sizes on
    an H100, ``benchmarks/RESULTS.md``; the Mosaic kernel on TPUs), XLA elsewhere. Without ``platform`` it answers ``"auto"``: the choice is
    made when the step is lowered (:func:`swiglu_grouped`). ``grouped-pallas`` /
    ``grouped-pallas-tpu`` / ``grouped-xla`` choose explicitly; given a ``platform`` where an
    explicit kernel would only run in Pallas' interpreter, raises ``ValueError``.
    """
    if impl not in MOE_IMPLS or impl == "reference":
        raise ValueError(f"no INT4 grouped matmul for MoE implementation {impl!r}; choose from {MOE_IMPLS[:-1]}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; choose from {PLATFORMS}")
    if impl == "grouped":
        if platform is None:
            return "auto"
        return next((k for k, ps in NATIVE_PLATFORMS.items() if platform in ps), "xla")
    kernel = impl.removeprefix("grouped-")
    if platform is not None and kernel in NATIVE_PLATFORMS and platform not in NATIVE_PLATFORMS[kernel]:
        raise ValueError(
            f"MoE implementation {impl!r}: the {INT4_KERNELS[kernel]} has no path for platform {platform!r} "
            f"(it runs compiled on {', '.join(NATIVE_PLATFORMS[kernel])} only); use 'grouped' or 'grouped-xla'"
        )
    return kernel


def kernel_fits(kernel: str, d_model: int, d_hidden: int) -> bool:
    """Whether ``kernel`` takes the experts' shapes (gate / up ``[d_hidden, d_model]``, down
    ``[d_model, d_hidden]``): the Triton kernel needs power-of-two tiles of at least 16
    outputs and 32 inputs dividing them; the others take any shape."""
    if kernel != "pallas":
        return True
    try:
        for n, k in ((d_hidden, d_model), (d_model, d_hidden)):
            int4_grouped.fit_config(int4_grouped.Config(), n, k)
    except ValueError:
        return False
    return True


def lowered_int4_kernel(impl: str, platform: str, d_model: int, d_hidden: int) -> str:
    """The INT4 kernel a step lowered for ``platform`` runs for experts of these (per-device)
    sizes: :func:`int4_kernel`, with ``grouped`` falling back to XLA where the platform's
    kernel does not take the shapes (:func:`kernel_fits`)."""
    kernel = int4_kernel(impl, platform)
    return kernel if impl != "grouped" or kernel_fits(kernel, d_model, d_hidden) else "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reference_grad(kernel, x, q, scales, sizes, layer):
    """``kernel(x, q, scales, sizes, layer=layer)`` differentiated like the reference path (the
    Pallas kernels have no autodiff rule): the gradient reaches x only, as the INT4 weights
    are never trained. ``q`` and ``scales`` may be tuples of several weights' (the kernel then
    gives a tuple of outputs)."""
    return kernel(x, q, scales, sizes, layer=layer)


def _reference_grad_fwd(kernel, x, q, scales, sizes, layer):
    return kernel(x, q, scales, sizes, layer=layer), (x, q, scales, sizes, layer)


def _reference_grad_bwd(kernel, residuals, g):
    x, q, scales, sizes, layer = residuals
    many = isinstance(q, tuple)  # several weights (int4_grouped_matmuls): a tuple of outputs
    qs, ss = (q, scales) if many else ((q,), (scales,))
    if layer is not None:
        qs, ss = tuple(a[layer] for a in qs), tuple(a[layer] for a in ss)

    def reference(x):
        ys = tuple(int4_ragged_dot(x, a, b, sizes, INT4_GROUP_SIZE) for a, b in zip(qs, ss, strict=True))
        return ys if many else ys[0]

    _, vjp = jax.vjp(reference, x)
    return (*vjp(g), None, None, None, None)


_reference_grad.defvjp(_reference_grad_fwd, _reference_grad_bwd)


def _swiglu_int4(w: dict, rows: jax.Array, sizes: jax.Array, layer: jax.Array | None, kernel: str,
                 interpret: bool) -> jax.Array:
    """:func:`swiglu_grouped` for INT4 experts through one kernel."""
    if layer is not None and kernel != "pallas":  # only the Triton kernel reads a layer of the stack in place
        w, layer = jax.tree.map(lambda a: a[layer], w), None
    if kernel == "xla":
        sizes, used = _experts_in_use(sizes, rows.shape[0])
        h = jax.nn.silu(grouped_matmul(rows, w["gate_proj"], sizes, used))
        h = h * grouped_matmul(rows, w["up_proj"], sizes, used)
        return grouped_matmul(h, w["down_proj"], sizes, used)
    if kernel == "pallas":
        fused = functools.partial(int4_grouped_matmul, interpret=interpret)
    else:
        def fused(x, q, scales, sizes, layer):
            return int4_grouped_matmul_tpu(x, q, scales, sizes, interpret=interpret)

    def matmul(x, proj):
        return _reference_grad(fused, x, proj["q"], proj["scales"], sizes, layer)

    gate, up = w["gate_proj"], w["up_proj"]
    if kernel == "pallas":  # gate and up in one launch
        pair = functools.partial(int4_grouped_matmuls, interpret=interpret)
        h = _reference_grad(pair, rows, (gate["q"], up["q"]), (gate["scales"], up["scales"]), sizes, layer)
    else:
        h = matmul(rows, gate), matmul(rows, up)
    return matmul(jax.nn.silu(h[0]) * h[1], w["down_proj"])


def swiglu_grouped(w: dict, rows: jax.Array, sizes: jax.Array, kernel: str, layer: jax.Array | None = None) -> jax.Array:
    """SwiGLU of ``rows`` [M, D] grouped contiguously by expert (``sizes`` [E] rows each)
    through the experts' raw weights ``w`` (``nnx.state(experts).to_pure_dict()``) -> [M, D].
    With ``layer``, ``w`` holds a run's stacked INT4 experts ``[L, E, ...]`` and layer
    ``layer`` is used: the Triton kernel reads it in place, the other kernels slice it first.

    Dense experts always use ``kimi_jax.kernels.grouped.ragged_dot`` (backend ``auto``). INT4
    experts use ``kernel`` (:func:`int4_kernel`): ``"auto"`` is chosen per platform when the
    step is lowered (``jax.lax.platform_dependent``, with :func:`lowered_int4_kernel`'s choice
    for each); a Pallas kernel runs compiled on its platform and in Pallas' interpreter
    elsewhere. The Pallas kernels read only the experts with rows, in one launch per
    projection. With ``"xla"`` and fewer rows than experts (decoding), the experts in use are
    gathered first (at most M, padded with empty groups), so only those are dequantized.
    """
    if not isinstance(w["gate_proj"], dict):
        if layer is not None:
            w = jax.tree.map(lambda a: a[layer], w)
        h = jax.nn.silu(grouped_matmul(rows, w["gate_proj"], sizes))
        return grouped_matmul(h * grouped_matmul(rows, w["up_proj"], sizes), w["down_proj"], sizes)
    if kernel not in (*INT4_KERNELS, "auto"):
        raise ValueError(f"unknown INT4 kernel {kernel!r}; choose from {(*INT4_KERNELS, 'auto')}")
    d_hidden, d_model = w["gate_proj"]["scales"].shape[-2], rows.shape[1]

    branches = {}

    def branch(name: str, interpret: bool):  # one callable per kernel: platform_dependent joins equal branches
        return branches.setdefault((name, interpret), functools.partial(_swiglu_int4, kernel=name, interpret=interpret))

    if kernel == "auto":
        chosen = {p: lowered_int4_kernel("grouped", p, d_model, d_hidden) for p in NATIVE_PLATFORMS["pallas"] + ("tpu",)}
        return jax.lax.platform_dependent(
            w, rows, sizes, layer, **{p: branch(k, False) for p, k in chosen.items()}, default=branch("xla", False)
        )
    if kernel == "xla":
        return _swiglu_int4(w, rows, sizes, layer, "xla", False)
    native = dict.fromkeys(NATIVE_PLATFORMS[kernel], branch(kernel, False))
    return jax.lax.platform_dependent(w, rows, sizes, layer, **native, default=branch(kernel, True))


def _int4_rows_reference(x, qs, scales, ids, fanout: int, layer):
    """:func:`int4_rows_matmuls` by the reference path: the rows grouped by expert, then
    ``int4_ragged_dot`` (ids outside ``[0, E)``: zero rows)."""
    if layer is not None:
        qs, scales = tuple(a[layer] for a in qs), tuple(a[layer] for a in scales)
    e = qs[0].shape[0]
    order, position, sizes = group_by_expert(jnp.where((ids >= 0) & (ids < e), ids, e), e)
    rows = x[order // fanout]
    return tuple(int4_ragged_dot(rows, a, b, sizes, INT4_GROUP_SIZE)[position] for a, b in zip(qs, scales, strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _int4_rows(fanout: int, interpret: bool, x, qs, scales, ids, layer):
    """:func:`int4_rows_matmuls`, differentiated like the reference path (the gradient reaches x)."""
    return int4_rows_matmuls(x, qs, scales, ids, fanout=fanout, interpret=interpret, layer=layer)


def _int4_rows_fwd(fanout, interpret, x, qs, scales, ids, layer):
    return _int4_rows(fanout, interpret, x, qs, scales, ids, layer), (x, qs, scales, ids, layer)


def _int4_rows_bwd(fanout, interpret, residuals, g):
    x, qs, scales, ids, layer = residuals
    _, vjp = jax.vjp(lambda x: _int4_rows_reference(x, qs, scales, ids, fanout, layer), x)
    return (*vjp(g), None, None, None, None)


_int4_rows.defvjp(_int4_rows_fwd, _int4_rows_bwd)


def swiglu_rows(w: dict, x: jax.Array, idx: jax.Array, layer: jax.Array | None = None,
                interpret: bool = False) -> jax.Array:
    """SwiGLU of each token ``x`` [T, D] through each of its chosen INT4 experts ``idx`` [T, K]
    (ids outside ``[0, E)``: zeros) by the per-row Triton kernel -> [T, K, D]: gate and up in
    one launch, then down, with no sort, gather or schedule. For few tokens (decoding one
    sequence); rows sharing an expert each read its weights. ``w``, ``layer``: as
    :func:`swiglu_grouped`."""
    T, K = idx.shape
    gate, up, down = w["gate_proj"], w["up_proj"], w["down_proj"]
    ids = idx.reshape(-1)
    g, u = _int4_rows(K, interpret, x, (gate["q"], up["q"]), (gate["scales"], up["scales"]), ids, layer)
    (out,) = _int4_rows(1, interpret, jax.nn.silu(g) * u, (down["q"],), (down["scales"],), ids, layer)
    return out.reshape(T, K, -1)


def experts_grouped(experts: Experts | Int4Experts, x: jax.Array, idx: jax.Array, kernel: str = "xla",
                    layer: jax.Array | None = None) -> jax.Array:
    """Token copies sorted by expert, grouped matmuls (:func:`swiglu_grouped`), unsorted:
    [T, D] -> [T, K, D] (``layer``: which layer of stacked experts). INT4 experts of up to
    :data:`ROWS_MAX_TOKENS` tokens on the Triton kernel run per row instead (:func:`swiglu_rows`)."""
    T, K = idx.shape
    w = nnx.state(experts).to_pure_dict()

    def grouped(w, x, idx, layer):
        order, position, sizes = group_by_expert(idx.reshape(-1), experts.n_experts)  # ids >= n_experts: no group
        out = swiglu_grouped(w, x[order // K], sizes, kernel, layer)
        return out[position].reshape(T, K, -1)

    if T > ROWS_MAX_TOKENS or not isinstance(experts, Int4Experts) or kernel not in ("pallas", "auto"):
        return grouped(w, x, idx, layer)
    d_hidden, d_model = w["gate_proj"]["scales"].shape[-2], x.shape[1]
    if kernel == "pallas":
        native, default = functools.partial(swiglu_rows, interpret=False), functools.partial(swiglu_rows, interpret=True)
    elif kernel_fits("pallas", d_model, d_hidden):
        native, default = swiglu_rows, grouped
    else:
        return grouped(w, x, idx, layer)
    return jax.lax.platform_dependent(w, x, idx, layer, **dict.fromkeys(NATIVE_PLATFORMS["pallas"], native),
                                      default=default)


class MoE(nnx.Module):
    """Routed experts plus the shared experts every token passes through."""

    def __init__(
        self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, impl: str = "grouped", expert_format: str = "dense",
        parallel: Parallel | None = None,
    ):
        if expert_format not in EXPERT_FORMATS:
            raise ValueError(f"unknown expert format {expert_format!r}; choose from {EXPERT_FORMATS}")
        self.set_impl(impl)
        self.capture = False
        self.parallel = parallel
        self.gate = Router(cfg, dtype=dtype, rngs=rngs)
        self.experts = (
            Int4Experts(cfg, rngs=rngs) if expert_format == "int4" else Experts(cfg, dtype=dtype, rngs=rngs)
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.shared_intermediate_size, dtype=dtype, rngs=rngs)
            if cfg.n_shared_experts
            else None
        )

    def set_impl(self, impl: str) -> None:
        if impl not in MOE_IMPLS:
            raise ValueError(f"unknown MoE implementation {impl!r}; choose from {MOE_IMPLS}")
        self.impl = impl

    def __call__(self, x: jax.Array, valid: jax.Array | None = None, layer: jax.Array | None = None) -> jax.Array:
        """``x`` [..., D] -> [..., D]. ``valid`` (x's leading shape, bool) marks the real tokens
        (None: all): the others are routed to no expert, so their experts are not read (idle
        slots of a decode step, padding of a prefill chunk) and their routed output is 0.
        ``layer``: which layer of the run this is, used when the INT4 experts come as the
        run's whole stack ``[L, E, ...]`` (the scan passes them unsliced, see
        ``kimi_jax.model.decoder``)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        shared = self.shared_experts
        # past every group: idle tokens choose expert E (the reference path takes only real experts)
        idle = None if valid is None or self.impl == "reference" else valid.reshape(-1)
        if shared is None:
            weights, idx, scores = self.gate(tokens, layer, idle)
        else:  # the projections of the tokens at once (one launch when read in place)
            logits, shared_gate, shared_up = projections(
                tokens, (self.gate.weight[...], shared.gate_proj[...], shared.up_proj[...]), layer,
                out_dtypes=(jnp.float32, None, None))
            weights, idx, scores = self.gate.route(logits, idle, layer)
        if self.capture:
            self.sow(nnx.Intermediate, "router_scores", scores)
            self.sow(nnx.Intermediate, "router_idx", idx)
            self.sow(nnx.Intermediate, "router_weights", weights)
        stacked = isinstance(self.experts, Int4Experts) and self.experts.gate_proj.q.ndim == 4
        shared_layer, layer = layer, layer if stacked else None
        if self.impl == "reference":
            per_expert = experts_reference(self.experts, tokens, idx, layer)
            routed = jnp.einsum("tkd,tk->td", per_expert.astype(jnp.float32), weights).astype(x.dtype)
        else:
            if self.parallel is not None:
                routed = self._expert_parallel(tokens, idx, weights, self.parallel.mesh, self.parallel.layout, layer)
            else:
                per_expert = experts_grouped(self.experts, tokens, idx, int4_kernel(self.impl), layer)  # 0 past groups
                routed = jnp.einsum("tkd,tk->td", per_expert.astype(jnp.float32), weights).astype(x.dtype)
        if shared is not None:
            routed = routed + shared.down(shared_gate, shared_up, shared_layer)
        return routed.reshape(shape)

    def _expert_parallel(self, tokens, idx, weights, mesh, layout, layer) -> jax.Array:
        """The grouped path inside ``shard_map``, experts split by the layout (a stack's layer
        ``layer`` sliced out first)."""
        state = nnx.state(self.experts)
        values = state.to_pure_dict()
        flat = dict(nnx.to_flat_state(state))
        axes = {path: (var.get_metadata()["axes"], var.shape) for path, var in flat.items()}
        if layer is not None:
            values = jax.tree.map(lambda a: a[layer], values)
            axes = {path: (a[1:], shape[1:]) for path, (a, shape) in axes.items()}
        specs = traverse_util.unflatten_dict({path: layout.spec(a, shape) for path, (a, shape) in axes.items()})

        kernel = int4_kernel(self.impl)

        def local(w, rows, ids):
            e_local = jax.tree.leaves(w["gate_proj"])[0].shape[0]
            sizes = jnp.bincount(ids, length=e_local + 1)[:e_local].astype(jnp.int32)
            return swiglu_grouped(w, rows, sizes, kernel)

        return expert_parallel_moe(
            tokens, idx, weights, values, specs, local, mesh=mesh, n_experts=self.experts.n_experts,
            expert_axes=layout.mesh_axes_of("expert"), token_axes=layout.mesh_axes_of("batch"),
            hidden_axes=layout.mesh_axes_of("expert_mlp"),
        )

