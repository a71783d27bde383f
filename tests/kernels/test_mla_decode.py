"""The split-K MLA decode kernel in Pallas' interpreter against its reference, and the reference
against the model's absorbed MLA attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kimi_jax
from kimi_jax.kernels import mla_decode as md
from kimi_jax.model.mla import MLA
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config

# Pairwise-distinct sizes: heads, latent, rope dim, slots (S not a multiple of any block_s).
N, C, R, S = 8, 32, 16, 37
SCALE = 0.3
# The interpreted kernel is a large XLA:CPU program; unoptimized code compiles in half the time.
FAST = {"xla_backend_optimization_level": 0}


@functools.cache
def _kernel(**kw):
    return jax.jit(functools.partial(md.mla_decode, scale=SCALE, interpret=True, **kw), compiler_options=FAST)


def _inputs(seed, B, T, L, dtype=jnp.float32):
    rng = np.random.default_rng(seed)

    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return draw(B, T, N, C), draw(B, T, N, R), draw(B, L, S, C), draw(B, L, S, R)


def _rel(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _check(args, layer, positions, tol=1e-5, **kw):
    positions = jnp.asarray(positions, jnp.int32)
    ref = md.mla_decode_reference(*args, layer, positions, scale=SCALE)
    out = jax.block_until_ready(_kernel(**kw)(*args, jnp.int32(layer), positions))
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    assert _rel(out, ref) < tol, _rel(out, ref)
    return out, ref


# Three rows (first slot, last slot, middle) over a stacked cache of 3 layers; 3 visible
# blocks of 16 slots at most (the last one partial), shared among 1, 3 and 8 splits (8: more
# splits than blocks). block_c 16: the accumulator in two column chunks.
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("layer", [0, 2])
def test_float32_matches_reference(splits, layer):
    args = _inputs(splits, B=3, T=1, L=3)
    _check(args, layer, [[0], [S - 1], [17]], splits=splits, block_s=16, block_c=16, min_split_slots=16)


def test_query_chunks_with_their_own_positions():
    """T = 4 queries per row, each masked at its own position (32 rows: two row blocks of 16);
    a query at position -1 sees no slot and gets zeros."""
    args = _inputs(7, B=3, T=4, L=1)
    positions = [[0, 1, 2, 3], [S - 4, S - 3, S - 2, S - 1], [9, 5, -1, 20]]
    out, _ = _check(args, 0, positions, splits=2, block_s=16, block_rows=16, min_split_slots=16)
    np.testing.assert_array_equal(np.asarray(out[2, 2]), 0.0)


def test_bfloat16_matches_reference():
    args = _inputs(11, B=1, T=4, L=3, dtype=jnp.bfloat16)
    # bf16 probabilities in the value product (float32 in the reference): 5e-4 here; bf16
    # rounding allows up to 1e-2.
    _check(args, 2, [[20, 21, 22, 23]], tol=1e-2, splits=2, block_s=16, min_split_slots=16)


def test_defaults_read_only_the_layer_and_the_visible_slots():
    """Other layers and the slots past a row's furthest position are NaN: never read (a row at
    position -1 reads nothing and gets zeros)."""
    q, q_pe, c_kv, k_pe = _inputs(13, B=3, T=1, L=3)
    positions = jnp.asarray([[5], [S - 1], [-1]], jnp.int32)
    ref = md.mla_decode_reference(q, q_pe, c_kv, k_pe, 1, positions, scale=SCALE)
    other_layer = jnp.arange(3)[None, :, None, None] != 1
    unseen = other_layer | (jnp.arange(S)[None, None, :, None] > positions[:, :1, None, None])
    poisoned = [jnp.where(unseen, jnp.nan, x) for x in (c_kv, k_pe)]
    out = _kernel()(q, q_pe, *poisoned, jnp.int32(1), positions)
    assert _rel(out, ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)


def test_rows_pick_the_cache_sequences_and_read_no_other():
    """Batch rows attend over cache sequences ``rows`` (a decode step of some of an engine's
    slots): the other sequences are NaN, never read."""
    q, q_pe, _, _ = _inputs(17, B=3, T=1, L=2)
    _, _, c_kv, k_pe = _inputs(18, B=5, T=1, L=2)
    rows = jnp.asarray([4, 0, 2], jnp.int32)
    positions = jnp.asarray([[S - 1], [3], [20]], jnp.int32)
    ref = md.mla_decode_reference(q, q_pe, c_kv, k_pe, 1, positions, scale=SCALE, rows=rows)
    want = md.mla_decode_reference(q, q_pe, c_kv[rows], k_pe[rows], 1, positions, scale=SCALE)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(want))
    unused = ~jnp.isin(jnp.arange(5), rows)[:, None, None, None]
    poisoned = [jnp.where(unused, jnp.nan, x) for x in (c_kv, k_pe)]
    out = _kernel()(q, q_pe, *poisoned, jnp.int32(1), positions, rows=rows)
    assert _rel(out, ref) < 1e-5


def test_auto_splits():
    assert md.auto_splits(1, 64, 32768) == 66  # 2 row blocks x 66 splits: one wave on 132 SMs
    assert md.auto_splits(32, 64, 32768) == 2
    assert md.auto_splits(32, 64, 32768, block_rows=64) == 4
    assert md.auto_splits(200, 64, 32768) == 1
    assert md.auto_splits(1, 64, 1000) == 4  # a short cache: 32 blocks, at least 8 per split
    assert md.auto_splits(1, 64, 1000, min_split_slots=32) == 32
    assert md.auto_splits(3, 8, 37) == 2  # 2 blocks: one split each (MIN_SPLITS)


@pytest.mark.parametrize("kv_len, per, used", [
    (0, 1, 0), (140, 1, 3), (64 * 8, 2, 4), (64 * 16, 4, 4), (64 * 17, 4, 5), (32768, 8, 64),
])
def test_short_rows_still_use_several_splits(kv_len, per, used):
    """Blocks of 64 slots, 66 splits, at least 4 blocks a split: but up to MIN_SPLITS (4)
    splits share a row shorter than 16 blocks; long rows are spread over the splits."""
    got = md._share(jnp.int32(kv_len), 66, 64, 4)
    assert (int(got[0]), int(got[1])) == (per, used)


def test_rounds_once_to_the_output_dtype():
    """``out_dtype`` bf16: the float32 result rounded once (by the combine kernel)."""
    args = _inputs(19, B=2, T=1, L=2)
    positions = jnp.asarray([[3], [30]], jnp.int32)
    full = _kernel(splits=3, block_s=16)(*args, jnp.int32(1), positions)
    out = _kernel(splits=3, block_s=16, out_dtype=jnp.bfloat16)(*args, jnp.int32(1), positions)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(full.astype(jnp.bfloat16)))


def test_rejects_bad_shapes():
    q, q_pe, c_kv, k_pe = _inputs(0, B=2, T=1, L=2)
    positions = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match="want \\[Bc, L, S, C\\]"):
        md.mla_decode(q, q_pe, c_kv[:, 0], k_pe, 0, positions, scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="positions"):
        md.mla_decode(q, q_pe, c_kv, k_pe, 0, positions[:, 0], scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="rows"):
        md.mla_decode(q, q_pe, c_kv, k_pe, 0, positions, scale=SCALE, rows=jnp.zeros(3, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="pass rows"):
        md.mla_decode(q, q_pe, c_kv[:1], k_pe[:1], 0, positions, scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="block_s = 24"):
        md.mla_decode(q, q_pe, c_kv, k_pe, 0, positions, scale=SCALE, block_s=24, interpret=True)


def test_reference_is_the_models_absorbed_attention():
    """Through ``MLA._absorb`` and ``MLA._project``, the reference gives ``MLA.attend_absorbed``."""
    cfg = kimi_jax.KimiConfig.from_dict(k25_config(TINY_TEXT, multimodal=False)).text
    mla = MLA(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    B, T, n, s = 3, 2, cfg.num_attention_heads, 11
    rng = np.random.default_rng(3)
    q_nope = jnp.asarray(rng.standard_normal((B, T, n, cfg.qk_nope_head_dim)), jnp.float32)
    q_pe = jnp.asarray(rng.standard_normal((B, T, n, cfg.qk_rope_head_dim)), jnp.float32)
    c_kv = jnp.asarray(rng.standard_normal((B, s, cfg.kv_lora_rank)), jnp.float32)
    k_pe = jnp.asarray(rng.standard_normal((B, s, cfg.qk_rope_head_dim)), jnp.float32)
    positions = jnp.asarray([[0, 1], [9, 10], [4, 7]], jnp.int32)
    want = mla.attend_absorbed(q_nope, q_pe, c_kv, k_pe, jnp.arange(s) <= positions[..., None])
    out = md.mla_decode_reference(mla._absorb(q_nope), q_pe, c_kv[:, None], k_pe[:, None], 0, positions,
                                  scale=cfg.softmax_scale)
    assert _rel(mla._project(out, absorbed=True), want) < 1e-5


def _cached_inputs(cfg, B, T, s, seed):
    """Random queries ``[B, T, heads, ...]`` and a 2-layer stacked cache of ``s`` tokens."""
    from kimi_jax.model.cache import LayerCache

    n = cfg.num_attention_heads
    rng = np.random.default_rng(seed)
    q_nope = jnp.asarray(rng.standard_normal((B, T, n, cfg.qk_nope_head_dim)), jnp.float32)
    q_pe = jnp.asarray(rng.standard_normal((B, T, n, cfg.qk_rope_head_dim)), jnp.float32)
    cache = LayerCache(jnp.asarray(rng.standard_normal((B, 2, s, cfg.kv_lora_rank)), jnp.float32),
                       jnp.asarray(rng.standard_normal((B, 2, s, cfg.qk_rope_head_dim)), jnp.float32))
    return q_nope, q_pe, cache


@pytest.mark.parametrize("T", [1, 3])
def test_models_kernel_path_equals_its_xla_path(T):
    """``MLA.attend_cache_pallas`` (what ``MLA.cached`` runs on NVIDIA GPUs) over one layer of
    a stacked cache equals the XLA path, whole-cache and in key blocks."""
    cfg = kimi_jax.KimiConfig.from_dict(k25_config(TINY_TEXT, multimodal=False)).text
    mla = MLA(cfg, dtype=jnp.float32, rngs=nnx.Rngs(1))
    s = 40
    q_nope, q_pe, cache = _cached_inputs(cfg, 2, T, s, seed=T)
    positions = jnp.asarray([[5 + t for t in range(T)], [30 + t for t in range(T)]], jnp.int32)
    layer = jnp.int32(1)
    kernel = jax.jit(functools.partial(mla.attend_cache_pallas, interpret=True), compiler_options=FAST)
    out = kernel(q_nope, q_pe, cache, layer, positions)
    for key_block in (s, 16):
        want = mla._attend_cache_xla(q_nope, q_pe, cache, layer, positions, absorbed=True, key_block=key_block)
        assert _rel(out, want) < 1e-5
    rows = jnp.asarray([1, 0], jnp.int32)  # the batch rows attend over the cache's sequences swapped
    out = kernel(q_nope, q_pe, cache, layer, positions, rows)
    for key_block in (s, 16):
        want = mla._attend_cache_xla(q_nope, q_pe, cache, layer, positions, rows, absorbed=True, key_block=key_block)
        assert _rel(out, want) < 1e-5


def test_models_kernel_path_reads_a_runs_stack_in_place():
    """With ``kv_b_proj`` and ``o_proj`` given as a run's stack (a cached step on one device),
    the kernel path reads their layer in place (``stacked_heads``, ``stacked_matmul``, in the
    interpreter) and equals the module with that layer's weights; the other layer is NaN."""
    text = TINY_TEXT | {"qk_nope_head_dim": 32, "v_head_dim": 16}  # head widths the kernels take
    cfg = kimi_jax.KimiConfig.from_dict(k25_config(text, multimodal=False)).text
    mla = MLA(cfg, dtype=jnp.float32, rngs=nnx.Rngs(2))
    s = 24
    q_nope, q_pe, cache = _cached_inputs(cfg, 2, 1, s, seed=5)
    positions, layer = jnp.asarray([[7], [20]], jnp.int32), jnp.int32(1)
    want = mla.attend_cache_pallas(q_nope, q_pe, cache, layer, positions, interpret=True)
    for name in ("kv_b_proj", "o_proj"):
        w = getattr(mla, name)[...]
        setattr(mla, name, nnx.Param(jnp.stack([jnp.full_like(w, jnp.nan), w])))
    out = mla.attend_cache_pallas(q_nope, q_pe, cache, layer, positions, interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    assert _rel(out, want) < 1e-5
    # off the kernels (other platforms), the layer is sliced out: the same
    assert _rel(mla._attend_cache_xla(q_nope, q_pe, cache, layer, positions, absorbed=True, key_block=s), want) < 1e-5
