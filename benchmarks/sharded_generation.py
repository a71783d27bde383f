"""Sharded prefill and decode of Kimi K2.5 layers with random weights, on a device mesh.

Builds the real K2.5 decoder config with ``--layers`` layers (layer 0 dense, the rest MoE
with 384 experts), creates random parameters directly in their shardings (no host copy),
and times batched prefill and decode through the generation engine. Prints per-device
memory and throughput as one JSON line.

    python benchmarks/sharded_generation.py --mesh gpu-2 --layers 18 --experts int4
    python benchmarks/sharded_generation.py --tiny --mesh data=1,expert=2,tensor=1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.config.model import KimiConfig, builtin_config_dir
from kimi_jax.inference.steps import BatchEngine
from kimi_jax.model.kimi import Kimi
from kimi_jax.parallel import Parallel
from kimi_jax.testing.models import random_model


def build(config: KimiConfig, mesh_spec: str, expert_format: str) -> Kimi:
    return random_model(config, expert_format=expert_format, parallel=Parallel.create(mesh_spec))


def memory() -> list[dict]:
    out = []
    for d in jax.local_devices():
        stats = d.memory_stats() or {}
        out.append({"device": str(d), "in_use_gb": round(stats.get("bytes_in_use", 0) / 1e9, 2),
                    "peak_gb": round(stats.get("peak_bytes_in_use", 0) / 1e9, 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", default="gpu-2")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--experts", default="int4", choices=["int4", "dense"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64, help="prefill chunk (tokens per sequence per step)")
    parser.add_argument("--tiny", action="store_true", help="shrink the widths (CPU smoke run)")
    args = parser.parse_args()

    raw = json.loads((builtin_config_dir("kimi-k2.5") / "config.json").read_text())["text_config"]
    raw["num_hidden_layers"] = args.layers
    if args.tiny:
        raw.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
                   num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, vocab_size=1024,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = KimiConfig.from_dict(raw)
    t0 = time.perf_counter()
    model = build(config, args.mesh, args.experts)
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - t0
    params_mem = memory()

    engine = BatchEngine(model)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, config.text.vocab_size, args.prompt)) for _ in range(args.batch)]
    length = args.prompt + args.decode + 128

    def run(decode_steps: int) -> tuple[float, float]:
        cache = engine.new_cache(args.batch, length)
        t = time.perf_counter()
        logits, cache = engine.prefill(prompts, cache, chunk=args.chunk)
        logits.block_until_ready()
        prefill = time.perf_counter() - t
        tokens = jnp.argmax(logits, -1)
        t = time.perf_counter()
        for _ in range(decode_steps):
            logits, cache = engine.decode(tokens, cache)
            tokens = jnp.argmax(logits, -1)
        tokens.block_until_ready()
        return prefill, time.perf_counter() - t

    t0 = time.perf_counter()
    run(2)  # compile
    compile_s = time.perf_counter() - t0
    prefill_s, decode_s = run(args.decode)
    result = {
        "mesh": args.mesh, "devices": jax.device_count(), "layers": args.layers, "experts": args.experts,
        "batch": args.batch, "prompt_tokens": args.prompt, "prefill_chunk": args.chunk, "decode_steps": args.decode,
        "init_s": round(init_s, 1), "compile_s": round(compile_s, 1),
        "prefill_s": round(prefill_s, 3), "prefill_tok_per_s": round(args.batch * args.prompt / prefill_s, 1),
        "decode_ms_per_step": round(1e3 * decode_s / args.decode, 2),
        "decode_tok_per_s": round(args.batch * args.decode / decode_s, 1),
        "memory_after_init": params_mem, "memory_end": memory(), "jax": jax.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
