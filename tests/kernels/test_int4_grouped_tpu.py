"""The TPU INT4 grouped matmul in Pallas' interpreter against the reference path
(``int4_ragged_dot``: dequantize, then ``jax.lax.ragged_dot``), and its TPU lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.kernels import int4_grouped_tpu as tk
from kimi_jax.quant.formats import int4_ragged_dot, pack_words

E, N, K = 6, 48, 256
SMALL = tk.Config(block_m=16, block_n=16)

# Uneven group sizes with empty experts: ends inside / on / across 16-row tiles, a sum
# below M (rows past it must be zeros), one expert holding every row, all experts empty.
GROUPS = [[3, 0, 17, 0, 5, 0], [0, 0, 33, 1, 0, 16], [0, 0, 0, 0, 0, 40], [1, 2, 3, 4, 5, 6], [0] * 6]


def _inputs(seed, m, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, K)), dtype)
    q = pack_words(jnp.asarray(rng.integers(-8, 8, (E, N, K)), jnp.int4))
    scales = jnp.asarray(rng.uniform(0.005, 0.05, (E, N, K // 32)), jnp.bfloat16)
    return x, q, scales


@pytest.mark.parametrize("groups", GROUPS)
def test_equals_reference_float32(groups):
    x, q, scales = _inputs(0, 40, jnp.float32)
    sizes = jnp.asarray(groups, jnp.int32)
    y = tk.int4_grouped_matmul_tpu(x, q, scales, sizes, cfg=SMALL, interpret=True)
    ref = int4_ragged_dot(x, q, scales, sizes)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert not np.asarray(y)[sum(groups):].any()


def test_bfloat16_rows_of_decode():
    """Few rows (decode: M below one tile) in bf16: W rounded once to bf16, as the reference."""
    x, q, scales = _inputs(1, 3, jnp.bfloat16)
    sizes = jnp.asarray([0, 2, 0, 0, 1, 0], jnp.int32)
    y = np.asarray(tk.int4_grouped_matmul_tpu(x, q, scales, sizes, interpret=True), np.float32)
    ref = np.asarray(int4_ragged_dot(x, q, scales, sizes), np.float32)
    assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max()


def test_blocks_over_the_input_axis():
    """in = 8192 in two blocks of 4096 (the accumulator carries across them)."""
    rng = np.random.default_rng(2)
    k = 8192
    x = jnp.asarray(rng.standard_normal((20, k)), jnp.float32)
    q = pack_words(jnp.asarray(rng.integers(-8, 8, (3, 16, k)), jnp.int4))
    scales = jnp.asarray(rng.uniform(0.005, 0.05, (3, 16, k // 32)), jnp.bfloat16)
    sizes = jnp.asarray([7, 0, 12], jnp.int32)
    cfg = tk.Config(block_m=16, block_n=16, block_k=4096)
    assert tk.fit_config(cfg, 20, 16, k).block_k == 4096
    y = tk.int4_grouped_matmul_tpu(x, q, scales, sizes, cfg=cfg, interpret=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(int4_ragged_dot(x, q, scales, sizes)), rtol=1e-5, atol=1e-4)


def test_work_items_skip_empty_experts():
    """Experts without rows get no item, so their weights are never read; every row tile is visited."""
    tiles, experts, row0, row1, count = tk.work_items(jnp.asarray([3, 0, 17, 0, 5, 0], jnp.int32), 3, 16)
    n = int(count[0])
    items = list(zip(*(np.asarray(a)[:n].tolist() for a in (tiles, experts, row0, row1))))
    # tile 0: experts 0 and 2; tile 1: experts 2 and 4; tile 2: past every row, zeros
    assert items == [(0, 0, 0, 3), (0, 2, 3, 20), (1, 2, 3, 20), (1, 4, 20, 25), (2, 4, 0, 0)]
    assert (np.asarray(tiles)[n:] == 2).all()  # past the count: the last item again
    assert not set(np.asarray(experts).tolist()) & {1, 3, 5}


def test_lowers_for_tpu_on_the_cpu():
    """Exported for TPU from this CPU (Mosaic lowers for a named TPU generation, given by an
    abstract mesh's device): the module holds the kernel's custom call."""
    x, q, scales = (jax.ShapeDtypeStruct(s, d) for s, d in
                    (((64, 7168), jnp.bfloat16), ((16, 2048, 896), jnp.uint32), ((16, 2048, 224), jnp.bfloat16)))
    sizes = jax.ShapeDtypeStruct((16,), jnp.int32)
    device = jax.sharding.AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        exported = jax.export.export(jax.jit(tk.int4_grouped_matmul_tpu), platforms=("tpu",))(x, q, scales, sizes)
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in exported.mlir_module()
    assert exported.out_avals[0].shape == (64, 2048)


def test_bad_shapes():
    x, q, scales = _inputs(0, 8, jnp.float32)
    with pytest.raises(ValueError, match="does not match x"):
        tk.int4_grouped_matmul_tpu(x[:, :128], q, scales, jnp.zeros((E,), jnp.int32))
    with pytest.raises(ValueError, match="scales"):
        tk.int4_grouped_matmul_tpu(x, q, scales[..., :4], jnp.zeros((E,), jnp.int32))
    with pytest.raises(ValueError, match="uint32 words"):
        tk.int4_grouped_matmul_tpu(x, q.astype(jnp.int32), scales, jnp.zeros((E,), jnp.int32))
