"""Peak host memory of the converter on a generated multi-GB checkpoint.

Writes a random K2.5-layout checkpoint (bf16, sharded) of about ``--gb`` gigabytes, then
converts it in a child process and prints the child's peak resident memory next to the
checkpoint's size and its largest single layer.

    python benchmarks/convert_memory.py --gb 2.5 --dir /tmp/convert-bench
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

from kimi_jax.config.model import KimiConfig
from kimi_jax.testing.synthetic import (
    k25_config,
    official_tensor_shapes,
    write_checkpoint,
)


def sized_config(gb: float) -> dict:
    """A config whose bf16 checkpoint is about ``gb`` GB, most of it routed experts."""
    text = dict(vocab_size=32768, hidden_size=1536, intermediate_size=4096, moe_intermediate_size=768,
                num_attention_heads=12, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6,
                max_position_embeddings=8192)
    per_moe_layer = 3 * 64 * 1536 * 768 * 2
    text["num_hidden_layers"] = 1 + max(1, round(gb * 1e9 / per_moe_layer))
    return k25_config(text, multimodal=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.5)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    config = sized_config(args.gb)
    shapes = official_tensor_shapes(KimiConfig.from_dict(config))
    total = sum(math.prod(s) for s in shapes.values()) * 2
    layer1 = sum(math.prod(s) for n, s in shapes.items() if ".layers.1." in n) * 2
    src, dst = args.dir / "hf", args.dir / "converted"
    if not (src / "config.json").is_file():
        print(f"writing {total / 1e9:.2f} GB checkpoint to {src}")
        write_checkpoint(src, config, shards=8)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kimi_jax.cli.main", "convert", str(src), str(dst), "--overwrite", "--quiet"],
                   check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"checkpoint {total / 1e9:.2f} GB, one MoE layer {layer1 / 1e9:.2f} GB, "
          f"one stacked expert projection {layer1 / 3e9 * 0.98:.2f} GB")
    print(f"convert: {time.perf_counter() - t0:.1f} s, peak RSS {peak / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
