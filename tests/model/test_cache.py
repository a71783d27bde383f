"""The compressed MLA cache: its size, its writes, and cached steps against the full forward pass."""

import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax.inference.steps import MAX_KEY_BLOCK, SCORE_BYTES, BatchEngine
from kimi_jax.model.cache import KVCache
from kimi_jax.model.layers import rms_norm
from kimi_jax.model.mla import absorbed_is_cheaper
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config, write_checkpoint

PROMPT_LENGTHS = [5, 11, 2]
DECODE_STEPS = 7


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    work = tmp_path_factory.mktemp("cache")
    src = write_checkpoint(work / "hf", k25_config(TINY_TEXT, multimodal=False), seed=3, dtype="float32")
    model = kimi_jax.load(kimi_jax.convert(src, work / "converted", dtype="float32", progress=False))
    return BatchEngine(model), model


@pytest.fixture(scope="module")
def sequences(engine):
    """Three sequences of random ids and the full forward pass's logits over them."""
    _, model = engine
    T = max(PROMPT_LENGTHS) + DECODE_STEPS
    ids = np.random.default_rng(0).integers(0, model.config.text.vocab_size, (len(PROMPT_LENGTHS), T))
    return ids, np.asarray(model(ids))


@pytest.mark.parametrize("dtype, itemsize", [(jnp.bfloat16, 2), (jnp.float32, 4)])
def test_bytes_per_token_per_layer(dtype, itemsize):
    cfg = kimi_jax.kimi_k25_config().text
    cache = KVCache.create(cfg, batch=2, length=3, dtype=dtype)
    assert cache.bytes_per_token_per_layer == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
    if dtype == jnp.bfloat16:  # the spec's figure for all 61 layers
        assert cache.bytes_per_token_per_layer * cfg.num_hidden_layers == 70_272
    assert cache.nbytes == 2 * 3 * cfg.num_hidden_layers * cache.bytes_per_token_per_layer


def test_cache_holds_one_stack_per_run_of_layers():
    cfg = kimi_jax.KimiConfig.from_dict(k25_config(TINY_TEXT, multimodal=False)).text
    cache = KVCache.create(cfg, batch=2, length=4, dtype=jnp.float32)
    assert [run.c_kv.shape[1] for run in cache.runs] == [count for _, count in cfg.layer_runs]
    assert cache.num_layers == cfg.num_hidden_layers and cache.length == 4 and cache.batch == 2


def test_write_places_rows_at_their_positions_and_drops_overflow():
    cfg = kimi_jax.KimiConfig.from_dict(k25_config(TINY_TEXT, multimodal=False)).text
    run = KVCache.create(cfg, batch=2, length=4, dtype=jnp.float32).runs[-1]
    c_kv = jnp.arange(2 * 2 * cfg.kv_lora_rank, dtype=jnp.float32).reshape(2, 2, -1) + 1
    k_pe = -jnp.ones((2, 2, cfg.qk_rope_head_dim))
    layer = run.c_kv.shape[1] - 1
    out = run.write(jnp.int32(layer), jnp.array([[1, 2], [3, 4]]), c_kv, k_pe)
    assert not np.asarray(out.c_kv[:, :layer]).any()  # other layers of the run untouched
    c, k = out.layer(jnp.int32(layer))
    np.testing.assert_array_equal(c[0, 1:3], c_kv[0])
    np.testing.assert_array_equal(c[1, 3], c_kv[1, 0])  # position 4 is past the end: dropped
    assert not np.asarray(c[0, [0, 3]]).any() and not np.asarray(c[1, :3]).any()
    np.testing.assert_array_equal(k[1, 3], k_pe[1, 0])


def test_absorbed_is_cheaper_for_short_steps():
    cfg = kimi_jax.kimi_k25_config().text
    assert absorbed_is_cheaper(cfg, 1) and absorbed_is_cheaper(cfg, 170)
    assert not absorbed_is_cheaper(cfg, 171)


def test_key_block_fits_the_score_budget(engine):
    eng = engine[0]
    assert eng.key_block(batch=1, num_queries=1, cache_length=100) == 100
    assert eng.key_block(batch=8, num_queries=1, cache_length=1 << 18) == MAX_KEY_BLOCK
    heads = eng.config.num_attention_heads
    block = eng.key_block(batch=8, num_queries=512, cache_length=1 << 18)
    assert block % 128 == 0 and 8 * 512 * heads * 4 * block <= SCORE_BYTES
    assert BatchEngine(engine[1], key_block=7).key_block(batch=8, num_queries=512, cache_length=100) == 7


def _prefill_then_decode(eng, ids, *, chunk, attention, cache_length=128):
    """Per step (prefill, then each decode), the logits [B, V] of the cached path."""
    cache = eng.new_cache(len(ids), cache_length, jnp.float32)
    prompts = [row[:n] for row, n in zip(ids, PROMPT_LENGTHS)]
    logits, cache = eng.prefill(prompts, cache, chunk=chunk, attention=attention)
    steps = [np.asarray(logits)]
    for s in range(DECODE_STEPS - 1):
        next_ids = [row[n + s] for row, n in zip(ids, PROMPT_LENGTHS)]
        logits, cache = eng.decode(next_ids, cache)
        steps.append(np.asarray(logits))
    np.testing.assert_array_equal(cache.lengths, np.array(PROMPT_LENGTHS) + DECODE_STEPS - 1)
    return np.stack(steps, axis=1), cache


@pytest.mark.parametrize("key_block", [None, 7])
@pytest.mark.parametrize("attention", ["absorbed", "expanded"])
def test_decode_matches_full_forward(engine, sequences, attention, key_block):
    """Whole-cache attention, and attention in blocks of 7 slots over a cache of 20 (whose
    last block is shifted back to fit), both equal the forward pass at every step."""
    ids, full = sequences
    eng = engine[0] if key_block is None else BatchEngine(engine[1], key_block=key_block)
    cache_length = 128 if key_block is None else 20
    steps, _ = _prefill_then_decode(eng, ids, chunk=512, attention=attention, cache_length=cache_length)
    expected = np.stack([full[b, n - 1 : n - 1 + DECODE_STEPS] for b, n in enumerate(PROMPT_LENGTHS)])
    err = np.abs(steps - expected).max()
    print(f"{attention} prefill (key block {key_block}) + absorbed decode vs full forward: "
          f"max |logit diff| = {err:.2e} (max |logit| {np.abs(expected).max():.2f})")
    assert err < 1e-5 * np.abs(expected).max()


def test_chunked_prefill_matches_unchunked(engine, sequences):
    ids, _ = sequences
    whole, whole_cache = _prefill_then_decode(engine[0], ids, chunk=512, attention="absorbed")
    chunked, chunked_cache = _prefill_then_decode(engine[0], ids, chunk=4, attention="absorbed")
    err = np.abs(whole - chunked).max()
    print(f"chunked (4) vs unchunked prefill: max |logit diff| = {err:.2e}")
    assert err < 1e-5 * np.abs(whole).max()
    for a, b in zip(whole_cache.runs, chunked_cache.runs):
        for n, row_a, row_b in zip(whole_cache.lengths.tolist(), a.c_kv, b.c_kv):  # [L, S, C] per row
            np.testing.assert_allclose(row_a[:, :n], row_b[:, :n], atol=1e-5)


def test_cache_holds_the_forward_pass_latents(engine, sequences):
    eng, model = engine
    ids, _ = sequences
    cache = eng.new_cache(len(ids), 128, jnp.float32)
    _, cache = eng.prefill(ids, cache, chunk=16)
    text = model.language_model
    attn = text.layer(0).self_attn
    x = rms_norm(text.embed(jnp.asarray(ids)), text.layer(0).input_layernorm[...], model.config.text.rms_norm_eps)
    cos, sin = text.rope(jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    c_kv, k_pe = attn.latents(x, cos, sin)
    T = ids.shape[1]
    cached_c_kv, cached_k_pe = cache.runs[0].layer(0)
    np.testing.assert_allclose(cached_c_kv[:, :T], c_kv, atol=5e-6)
    np.testing.assert_allclose(cached_k_pe[:, :T], k_pe, atol=5e-6)
