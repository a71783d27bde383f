"""End-to-end parity with transformers' DeepseekV3ForCausalLM through the converter (float32)."""

import numpy as np
import pytest

import kimi_jax
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

torch = pytest.importorskip("torch")
from hf_reference import hf_logits, load_hf_text_model  # noqa: E402

pytestmark = pytest.mark.reference

# Three configs with pairwise-distinct sizes inside each; together they cover the K2.5
# wrapper names and raw `rope_scaling`, transformers-5 `rope_parameters`, n_group > 1 with
# topk_group < n_group, two dense layers, q_lora_rank null, and mscale != mscale_all_dim.
CONFIGS = {
    "k25-wrapper": dict(
        text=dict(vocab_size=320, hidden_size=72, intermediate_size=136, moe_intermediate_size=40,
                  num_hidden_layers=3, num_attention_heads=5, q_lora_rank=56, kv_lora_rank=24,
                  qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=14, n_routed_experts=10,
                  num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=1024,
                  rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=16,
                                    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
        k25_names=True,
    ),
    "groups-two-dense-no-qlora": dict(
        text=dict(vocab_size=288, hidden_size=80, intermediate_size=112, moe_intermediate_size=36,
                  num_hidden_layers=4, num_attention_heads=3, q_lora_rank=None, kv_lora_rank=28,
                  qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=18, n_routed_experts=16,
                  num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=2,
                  n_shared_experts=2, max_position_embeddings=2048, rope_scaling=None,
                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=16.0,
                                       original_max_position_embeddings=24, beta_fast=16.0,
                                       beta_slow=2.0, mscale=1.0, mscale_all_dim=1.0)),
        k25_names=False,
    ),
    "groups-mscale": dict(
        text=dict(vocab_size=352, hidden_size=64, intermediate_size=100, moe_intermediate_size=44,
                  num_hidden_layers=3, num_attention_heads=6, q_lora_rank=40, kv_lora_rank=20,
                  qk_nope_head_dim=14, qk_rope_head_dim=10, v_head_dim=12, n_routed_experts=12,
                  num_experts_per_tok=2, n_group=3, topk_group=2, first_k_dense_replace=1,
                  max_position_embeddings=4096, rms_norm_eps=1e-6,
                  rope_scaling=dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=20,
                                    beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8)),
        k25_names=False,
    ),
}
SEQ = 48  # longer than every original_max_position_embeddings above


def text_only(cfg: dict) -> dict:
    """The text config alone, as a plain DeepSeek-V3 / K2 checkpoint spells it."""
    text = dict(cfg["text_config"])
    if text.get("rope_scaling") is None:
        text.pop("rope_scaling", None)
    return text


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    spec = CONFIGS[request.param]
    cfg = k25_config(spec["text"], multimodal=False)
    if not spec["k25_names"]:
        cfg = text_only(cfg)
    work = tmp_path_factory.mktemp(request.param)
    src = write_checkpoint(work / "hf", cfg, seed=len(request.param), dtype="float32", k25_names=spec["k25_names"])
    kimi_jax.convert(src, work / "converted", dtype="float32", progress=False)
    model = kimi_jax.load(work / "converted")
    ref = load_hf_text_model(src, work / "hf_text")
    ids = np.random.default_rng(0).integers(0, cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size")), (2, SEQ))
    return request.param, model, ref, ids


def test_logits_match_transformers(case):
    name, model, ref, ids = case
    ours, theirs = np.asarray(model(ids)), hf_logits(ref, ids)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{name}: max |logit diff| / max |logit| = {err:.2e}")
    assert err < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


# ------------------------------------------------------------------ components


def _hidden(model, ids, seed=1):
    D = model.config.text.hidden_size
    return np.random.default_rng(seed).normal(size=(*ids.shape, D)).astype(np.float32)


def test_yarn_inverse_frequencies_and_softmax_scale(case):
    from kimi_jax.model.layers import rope_attention_factor, yarn_inv_freq

    _, model, ref, _ = case
    cfg = model.config.text
    np.testing.assert_allclose(yarn_inv_freq(cfg), ref.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    assert rope_attention_factor(cfg) == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-6)
    assert cfg.softmax_scale == pytest.approx(ref.model.layers[0].self_attn.scaling, rel=1e-6)


def test_router_choices_and_weights(case):
    _, model, ref, ids = case
    cfg = model.config.text
    i = cfg.first_k_dense_replace
    x = _hidden(model, ids).reshape(-1, cfg.hidden_size)
    weights, idx, _ = model.language_model.layer(i).mlp.gate(x)
    counts = np.bincount(np.asarray(idx).ravel(), minlength=cfg.n_routed_experts)
    assert counts.max() > 1.5 * counts.mean()  # uneven routing: a routing bug cannot hide behind ties
    with torch.no_grad():
        _, ref_w, ref_idx = ref.model.layers[i].mlp.gate(torch.as_tensor(x))
    order, ref_order = np.argsort(np.asarray(idx), -1), np.argsort(ref_idx.numpy(), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1),
                                  np.take_along_axis(ref_idx.numpy(), ref_order, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, -1),
                               np.take_along_axis(ref_w.numpy(), ref_order, -1), rtol=1e-5, atol=1e-6)


def test_one_mla_block(case):
    import jax.numpy as jnp

    _, model, ref, ids = case
    x = _hidden(model, ids)
    B, T = ids.shape
    lm = model.language_model
    cos, sin = lm.rope(jnp.broadcast_to(jnp.arange(T), (B, T)))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    ours = np.asarray(lm.layer(0).self_attn(jnp.asarray(x), cos, sin, mask))
    xt = torch.as_tensor(x)
    pos = torch.arange(T)[None].expand(B, T)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
    with torch.no_grad():
        pe = ref.model.rotary_emb(xt, pos)
        theirs = ref.model.layers[0].self_attn(xt, position_embeddings=pe, attention_mask=causal)[0].numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5


def test_one_moe_block(case):
    _, model, ref, ids = case
    i = model.config.text.first_k_dense_replace
    x = _hidden(model, ids)
    ours = np.asarray(model.language_model.layer(i).mlp(x))
    with torch.no_grad():
        theirs = ref.model.layers[i].mlp(torch.as_tensor(x)).numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5
