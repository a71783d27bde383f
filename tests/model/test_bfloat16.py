"""bfloat16 on the CPU: the default dtype runs (prefill, decode) and stays close to float32."""

import jax
import jax.numpy as jnp
import numpy as np

import kimi_jax
from kimi_jax.inference.steps import BatchEngine
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

# Head and latent sizes like K2.5's (nope 128, rope 64, v 128), other widths small.
TEXT = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
            n_routed_experts=16, num_experts_per_tok=4)


def test_bfloat16_generation_close_to_float32(tmp_path):
    src = write_checkpoint(tmp_path / "hf", k25_config(TEXT, multimodal=False), seed=3)
    ckpt = kimi_jax.convert(src, tmp_path / "converted", progress=False)
    bf16, f32 = kimi_jax.load(ckpt), kimi_jax.load(ckpt, dtype="float32")
    assert bf16.language_model.embed_tokens.dtype == jnp.bfloat16
    prompts = [list(range(3, 40)), list(range(100, 117))]
    logits = {}
    for name, model in (("bf16", bf16), ("f32", f32)):
        engine = BatchEngine(model, key_block=64)  # a 150-slot cache is attended in blocks of 64
        cache = engine.new_cache(2, 150)
        first, cache = engine.prefill(prompts, cache, chunk=16)
        second, _ = engine.decode(jnp.argmax(first, -1), cache)
        logits[name] = np.stack([np.asarray(first), np.asarray(second)])
    p, q = jax.nn.log_softmax(logits["f32"]), jax.nn.log_softmax(logits["bf16"])
    kl = np.asarray((jnp.exp(p) * (p - q)).sum(-1))
    assert kl.max() < 0.05, kl
    assert (logits["f32"].argmax(-1) == logits["bf16"].argmax(-1)).mean() >= 0.75
