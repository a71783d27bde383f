"""One grouped matmul with backends: rows grouped contiguously, each group times its own weight.

Einsum letters: M rows, K inputs, N outputs, G groups.

:func:`ragged_dot` has ``jax.lax.ragged_dot``'s contract (rows past the groups give zeros),
accumulates in float32 and returns the inputs' result dtype. Backends (:data:`BACKENDS`):

- ``xla``: ``jax.lax.ragged_dot``. Runs anywhere; the reference. On GPUs XLA lowers it to a
  form that materializes [G, M, N]: at Kimi K2.5's expert sizes on an H200 3-12x slower than
  tokamax's kernel, and out of memory at 8192 rows.
- ``tokamax``: ``tokamax.ragged_dot`` with its kernel for the platform the step is lowered for
  (:data:`TOKAMAX_KERNELS`): Pallas Mosaic GPU on ``cuda`` (sm80, sm90, sm100 in tokamax
  0.0.17), Pallas Mosaic TPU on ``tpu``; tokamax's XLA implementation elsewhere and wherever
  the kernel does not take the inputs. tokamax picks a kernel's code from the local device,
  so the kernel is used only where the step is traced on a device of its platform (elsewhere
  the lowered step holds the XLA implementation; for TPUs, ``tokamax.config.cross_compile``
  under an abstract mesh of TPUs lowers the kernel on any host). The kernels take fewer
  shapes than XLA: rows are zero-padded to :data:`ROW_MULTIPLE`; on GPUs K and N must be
  multiples of 64 and the dtype 16-bit, on TPUs K and N at least 128. Gradients go through
  the same kernels (:func:`_tokamax_bwd`).
- ``auto``: tokamax on ``cuda`` and ``tpu``, xla elsewhere, chosen when the step is lowered
  (``jax.lax.platform_dependent``), so one traced step exports for every platform; xla for
  fewer than :data:`MIN_KERNEL_ROWS` rows. Inside :func:`use_backend`, ``auto`` means the
  backend given there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import tokamax  # not imported lazily: its import adds to jit's cache key, so steps traced before it would retrace

BACKENDS = ("auto", "xla", "tokamax")
TOKAMAX_KERNELS = {"cuda": "mosaic_gpu", "tpu": "mosaic_tpu"}
"""tokamax's kernel by lowering platform; ``auto`` takes tokamax on these platforms only."""
ROW_MULTIPLE = {"cuda": 64, "tpu": 128}
"""Rows are zero-padded to a multiple of this for the kernel. Mosaic GPU: tokamax's kernels
fail to lower rows not a multiple of 8, and sm90's weights' gradient rows above 64 not a
multiple of 64. Mosaic TPU: every dimension at least 128."""
MIN_KERNEL_ROWS = 16
"""``auto`` takes xla below this many rows: on an H100 (32 experts of 7168 x 2048, bf16) 8 rows
took 0.66 ms stock and 5.3 ms with tokamax (its rows padded to 64, every expert's tile run),
23 rows 3.6 ms each (``benchmarks/RESULTS.md``)."""
_RAGGED_CONTRACTING = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
)
"""x [M, K] and g [M, N] contracted over the rows of each group -> [G, K, N] (the weights' gradient)."""
_PREFERRED = jax.make_user_context(None)  # part of jit's cache key: a step retraces when it changes


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within this context, calls asking for ``auto`` use ``backend`` (``xla`` or ``tokamax``):
    compare backends through a whole model. jit retraces a step traced under another choice."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown grouped-matmul backend {backend!r} for auto; choose from {BACKENDS[1:]}")
    with _PREFERRED(backend):
        yield


def ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, backend: str = "auto") -> jax.Array:
    """Rows of ``x`` [M, K] in consecutive groups of ``group_sizes`` [G] rows, group g times
    ``w[g]`` ([G, K, N]) -> [M, N]; rows past ``sum(group_sizes)`` are zeros.

    ``backend`` is one of :data:`BACKENDS` (see the module docstring). Differentiable in x
    and w.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown grouped-matmul backend {backend!r}; choose from {BACKENDS}")
    if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"ragged_dot: expected x [M, K], w [G, K, N] and group_sizes [G], got shapes "
            f"{x.shape}, {w.shape} and {group_sizes.shape}"
        )
    if x.shape[1] != w.shape[1] or group_sizes.shape[0] != w.shape[0]:
        raise ValueError(
            f"ragged_dot: x {x.shape}, w {w.shape} and group_sizes {group_sizes.shape} disagree: "
            "expected x [M, K], w [G, K, N], group_sizes [G]"
        )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"ragged_dot: group_sizes must be integers, got {group_sizes.dtype}")
    if backend == "auto" and _PREFERRED.value is not None:
        backend = _PREFERRED.value
    elif backend == "auto" and x.shape[0] < MIN_KERNEL_ROWS:
        backend = "xla"
    if backend == "xla":
        return _xla(x, w, group_sizes)
    kernels = {p: functools.partial(_tokamax_on, p) for p in TOKAMAX_KERNELS}
    default = _xla if backend == "auto" else functools.partial(_tokamax_on, None)
    return jax.lax.platform_dependent(x, w, group_sizes, **kernels, default=default)


def _xla(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    return y.astype(jnp.result_type(x, w))


def _tokamax_on(platform: str | None, x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The tokamax backend lowered for ``platform``: its kernel there where the shapes allow it
    (rows padded), else tokamax's XLA implementation."""
    kernel = TOKAMAX_KERNELS.get(platform)
    if kernel is None or not _kernel_takes(platform, *w.shape[1:]):
        return _tokamax(x, w, group_sizes, ("xla",))
    m = x.shape[0]
    x = jnp.pad(x, ((0, -m % ROW_MULTIPLE[platform]), (0, 0)))
    return _tokamax(x, w, group_sizes, (kernel, "xla"))[:m]


def _kernel_takes(platform: str, k: int, n: int) -> bool:
    """Whether tokamax's kernel for ``platform`` takes weights [G, k, n] (with padded rows)."""
    return k % 64 == 0 and n % 64 == 0 if platform == "cuda" else min(k, n) >= 128


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tokamax(x: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: tuple[str, ...]) -> jax.Array:
    """``tokamax.ragged_dot`` through the first of ``implementation`` that takes the inputs
    (tokamax tries the next on ``NotImplementedError``, e.g. a kernel off its device). Its
    kernels leave the rows past the groups unwritten: they are zeroed here."""
    y = tokamax.ragged_dot(x, w, group_sizes, implementation=implementation)
    return jnp.where(jnp.arange(x.shape[0])[:, None] < group_sizes.sum(), y, 0)


def _tokamax_fwd(x, w, group_sizes, implementation):
    return _tokamax(x, w, group_sizes, implementation), (x, w, group_sizes)


def _tokamax_bwd(implementation, residuals, g):
    """dx [M, K] = g w^T per group, through :func:`_tokamax` (zeros past the groups, unlike
    tokamax's own gradient); dw [G, K, N] = x^T g over each group's rows, through tokamax with
    its XLA fallback (of its GPU kernels, only sm90's computes this)."""
    x, w, group_sizes = residuals
    dx = _tokamax(g, jnp.swapaxes(w, 1, 2), group_sizes, implementation)
    dw = tokamax.ragged_dot_general(x, g, group_sizes, _RAGGED_CONTRACTING, implementation=implementation)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_tokamax.defvjp(_tokamax_fwd, _tokamax_bwd)
