"""The grouped matmul's backends against a per-group einsum, values and gradients (tokamax's
TPU kernel in Pallas' interpreter too), and the backend ``auto`` picks when a step is lowered
for each platform.

Einsum letters: M rows, K inputs, N outputs, G groups."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.kernels import grouped

M, K, N, G = 23, 12, 10, 5  # pairwise distinct
GROUPS = [
    [5, 0, 9, 0, 3],  # empty groups; 17 of 23 rows grouped, the rest must come out zero
    [0, 0, 23, 0, 0],  # one group holds every row
    [0, 0, 0, 0, 0],  # no row grouped
]


def _inputs(dtype, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (G, K, N), jnp.float32).astype(dtype)
    return x, w, jax.random.normal(kg, (M, N), jnp.float32).astype(dtype)


def reference(x, w, sizes):
    """Each grouped row times its group's weight, gathered per row: "mk,mkn->mn"."""
    ids = np.repeat(np.arange(len(sizes)), sizes)
    grouped_rows = np.arange(x.shape[0]) < len(ids)
    per_row = w[np.pad(ids, (0, x.shape[0] - len(ids)))]
    return jnp.einsum("mk,mkn->mn", jnp.where(grouped_rows[:, None], x, 0), per_row,
                      preferred_element_type=jnp.float32).astype(x.dtype)


@pytest.mark.parametrize("backend", grouped.BACKENDS)
@pytest.mark.parametrize("sizes", GROUPS)
def test_float32_values_and_gradients_equal_the_reference(backend, sizes):
    x, w, cotangent = _inputs(jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)

    def loss(f, x, w):
        return jnp.sum(f(x, w) * cotangent)

    def ours(x, w):
        return grouped.ragged_dot(x, w, gs, backend=backend)

    def ref(x, w):
        return reference(x, w, sizes)

    y = jax.jit(ours)(x, w)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref(x, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(y)[sum(sizes):], 0.0)
    dx, dw = jax.jit(jax.grad(lambda x, w: loss(ours, x, w), argnums=(0, 1)))(x, w)
    rx, rw = jax.grad(lambda x, w: loss(ref, x, w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dx, rx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, rw, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(dx)[sum(sizes):], 0.0)


@pytest.mark.parametrize("backend", grouped.BACKENDS)
def test_bfloat16_matches_the_reference(backend):
    sizes = GROUPS[0]
    x, w, _ = _inputs(jnp.bfloat16, seed=1)
    y = grouped.ragged_dot(x, w, jnp.asarray(sizes, jnp.int32), backend=backend)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_bad_arguments_raise():
    x, w, _ = _inputs(jnp.float32)
    gs = jnp.asarray(GROUPS[0], jnp.int32)
    with pytest.raises(ValueError, match=r"backend 'cutlass'; choose from \('auto', 'xla', 'tokamax'\)"):
        grouped.ragged_dot(x, w, gs, backend="cutlass")
    with pytest.raises(ValueError, match="unknown grouped-matmul backend 'auto' for auto"):
        with grouped.use_backend("auto"):
            pass
    with pytest.raises(ValueError, match="disagree"):
        grouped.ragged_dot(x[:, :-1], w, gs)
    with pytest.raises(ValueError, match="disagree"):
        grouped.ragged_dot(x, w, gs[:-1])
    with pytest.raises(ValueError, match=r"expected x \[M, K\], w \[G, K, N\]"):
        grouped.ragged_dot(x, w[0], gs)
    with pytest.raises(ValueError, match="must be integers"):
        grouped.ragged_dot(x, w, gs.astype(jnp.float32))


def _lowered(jitted, platform, *args):
    return jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text(debug_info=True)


@pytest.mark.parametrize("platform, tokamax", [("cuda", True), ("tpu", True), ("cpu", False)])
def test_auto_is_chosen_when_lowered(platform, tokamax):
    """One traced function: tokamax's op in the CUDA and TPU modules (its XLA implementation,
    as this host is neither), stock ragged_dot in the CPU one; use_backend overrides auto."""
    x, w, _ = _inputs(jnp.bfloat16)
    gs = jnp.asarray(GROUPS[0], jnp.int32)

    f = jax.jit(lambda x, w: grouped.ragged_dot(x, w, gs))  # one jitted function: retraced per choice
    assert ("tokamax" in _lowered(f, platform, x, w)) == tokamax
    with grouped.use_backend("tokamax"):
        assert "tokamax" in _lowered(f, platform, x, w)
    with grouped.use_backend("xla"):
        assert "tokamax" not in _lowered(f, platform, x, w)


def test_auto_takes_xla_for_few_rows():
    x, w, _ = _inputs(jnp.bfloat16)
    x = x[: grouped.MIN_KERNEL_ROWS - 1]
    gs = jnp.asarray([5, 0, 9, 0, 0], jnp.int32)
    f = jax.jit(lambda x, w: grouped.ragged_dot(x, w, gs))
    assert "tokamax" not in _lowered(f, "cuda", x, w)
    assert "tokamax" in _lowered(jax.jit(lambda x, w: grouped.ragged_dot(x, w, gs, backend="tokamax")), "cuda", x, w)


def _as_tpu_host(monkeypatch):
    """tokamax's TPU kernel taken as runnable on this host, lowered for a TPU v5p."""
    from tokamax._src.ops.ragged_dot import pallas_mosaic_tpu

    monkeypatch.setattr(pallas_mosaic_tpu.PallasMosaicTpuRaggedDot, "supported_on", lambda self, device: True)
    device = jax.sharding.AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device)
    )


def _as_hopper_host(monkeypatch):
    """tokamax's GPU kernels taken as runnable on this host, an sm90 GPU (tokamax reads the
    local device's compute capability)."""
    from tokamax._src import gpu_utils

    monkeypatch.setattr(gpu_utils, "_compute_capability", lambda device=None: 9.0)
    monkeypatch.setattr(gpu_utils, "has_mosaic_gpu_support", lambda device=None: True)
    return contextlib.nullcontext()


@pytest.mark.parametrize("platform, host, kernels", [
    ("cuda", _as_hopper_host, {"ragged_dot_sm90", "ragged_contracting_dim_dot_sm90"}),
    ("tpu", _as_tpu_host, {"pallas_tpu_ragged_dot_gmm", "pallas_tpu_ragged_dot_tgmm"}),
])
def test_auto_lowers_tokamax_kernels_on_their_platform(monkeypatch, platform, host, kernels):
    """Traced on a device of the platform (faked here), the forward and both gradients run
    through tokamax's kernels, with no stock ragged_dot left, for a row count the kernels do
    not take as it is (padded)."""
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (M, 256), jnp.bfloat16)
    w = jax.random.normal(kw, (G, 256, 384), jnp.bfloat16)
    gs = jnp.asarray(GROUPS[0], jnp.int32)

    def loss(x, w):
        return jnp.sum(grouped.ragged_dot(x, w, gs), dtype=jnp.float32)

    with host(monkeypatch):
        text = _lowered(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), platform, x, w)
    assert "chlo.ragged_dot" not in text
    assert kernels <= set(re.findall(r"\w+", text))  # the forward and dx: the first; dw: the second


def test_tokamax_tpu_kernel_interpreted_equals_the_reference(monkeypatch):
    """tokamax's TPU kernel in Pallas' interpreter on this CPU, through the tokamax backend's
    TPU branch (rows padded to 128, rows past the groups zeroed, its own gradient)."""
    from tokamax._src.ops.ragged_dot import api, pallas_mosaic_tpu

    interpreted = pallas_mosaic_tpu.PallasMosaicTpuRaggedDot(interpret=True)
    monkeypatch.setattr(api, "IMPLEMENTATIONS", {**api.IMPLEMENTATIONS, "mosaic_tpu": interpreted})
    sizes = GROUPS[0]
    kx, kw, kg = jax.random.split(jax.random.key(5), 3)
    x, w = jax.random.normal(kx, (M, 128)), jax.random.normal(kw, (G, 128, 256))
    cotangent = jax.random.normal(kg, (M, 256))
    gs = jnp.asarray(sizes, jnp.int32)

    def loss(f, x, w):
        return jnp.sum(f(x, w) * cotangent)

    def ours(x, w):
        return grouped._tokamax_on("tpu", x, w, gs)

    with _as_tpu_host(monkeypatch):
        assert "pallas_call" in str(jax.make_jaxpr(ours)(x, w))
        y = jax.jit(ours)(x, w)
        dx, dw = jax.jit(jax.grad(lambda x, w: loss(ours, x, w), argnums=(0, 1)))(x, w)
    rx, rw = jax.grad(lambda x, w: loss(lambda x, w: reference(x, w, sizes), x, w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(y, reference(x, w, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y)[sum(sizes):], 0.0)
    # sums of 128-256 products of magnitude up to ~20, in another order than the reference's
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-4)
