"""The peer of ``kimi-jax bench moe``: transformers' ``DeepseekV3MoE`` at Kimi K2.5 sizes on one GPU.

384 routed experts of 7168 x 2048 (top 8), one shared expert, bf16 weights and activations,
the experts run through ``torch`` grouped matmuls (``experts_implementation="grouped_mm"``).
Measures torch's copy bandwidth (``x * 2`` over 2 GiB of bf16) and bf16 matmul rate (8192^3)
like ``kimi_jax.bench.floors``, then times one forward per token count with CUDA events
(median of ``--iters`` after a warm-up) and appends rows (``impl``
``transformers-grouped_mm``, ``experts`` ``bf16``) with the JAX benchmark's fields (bytes of
the distinct chosen experts + router + shared expert, their ratio to the bandwidth, the
ratio to the matmul rate) to the same JSON lines file, so RESULTS.md can put them side by
side. PyTorch is not a dependency of kimi-jax, so this stays a script; run it in its own
process after the JAX benchmark (JAX holds most of the GPU's memory while it runs).

    python benchmarks/moe_torch_peer.py [--tokens 1 8 64 256 4096 16384] [--out benchmarks/results/moe.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import transformers
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

RESULTS = Path(__file__).parent / "results"


def median_ms(fn, iters: int) -> float:
    """Median CUDA-event time of ``fn()`` in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Bytes per second read + written by ``x * 2`` over ``n_bytes`` of bf16."""
    x = torch.randn(n_bytes // 2, device="cuda", dtype=torch.bfloat16)
    return 2 * n_bytes / (median_ms(lambda: x * 2, 20) / 1e3)


def matmul_rate(n: int = 8192) -> float:
    """bf16 FLOP/s of an ``n`` x ``n`` x ``n`` matmul."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (median_ms(lambda: a @ b, 20) / 1e3)


def bytes_read(moe: DeepseekV3MoE, x: torch.Tensor) -> tuple[int, int]:
    """(distinct experts the router chooses for ``x``, the bytes a forward must read at least:
    those experts' weights, the router and the shared expert)."""
    # the chosen experts are the router's one integer output (its outputs' order differs across versions)
    [chosen] = [t for t in moe.gate(x) if not t.is_floating_point()]
    used = len(torch.unique(chosen))
    per_expert = sum(p.nbytes for p in moe.experts.parameters()) / moe.config.n_routed_experts
    fixed = sum(p.nbytes for module in (moe.gate, moe.shared_experts) for p in module.parameters())
    return used, int(used * per_expert + fixed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 4096, 16384])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "moe.jsonl"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_torch_peer: needs a CUDA GPU")

    cfg = DeepseekV3Config(
        hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=384, num_experts_per_tok=8,
        n_shared_experts=1, n_group=1, topk_group=1, experts_implementation="grouped_mm",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    bw, rate = copy_bandwidth(), matmul_rate()
    with torch.device("cuda"):
        moe = DeepseekV3MoE(cfg).eval()
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
    gpu = torch.cuda.get_device_name()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}: DeepseekV3MoE grouped_mm; "
          f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    D, F, K = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    for t in args.tokens:
        x = torch.randn(1, t, D, device="cuda")
        with torch.inference_mode():
            used, need = bytes_read(moe, x)
            ms = median_ms(lambda x=x: moe(x), args.iters)
        seconds, flops = ms / 1e3, 2 * t * (K + cfg.n_shared_experts) * 3 * D * F
        row = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
               "transformers": transformers.__version__, "tokens": t, "experts": "bf16",
               "impl": "transformers-grouped_mm", "ms": round(ms, 4), "bytes": need, "distinct_experts": used,
               "tb_s": round(need / seconds / 1e12, 3), "bw_ratio": round(need / seconds / bw, 3),
               "tflop_s": round(flops / seconds / 1e12, 1), "mm_ratio": round(flops / seconds / rate, 3),
               "bandwidth_tb_s": round(bw / 1e12, 3), "matmul_tflop_s": round(rate / 1e12, 1)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{t:>6} tokens {ms:9.3f} ms, {used:>3} experts, {need / 1e9:6.2f} GB, {row['tb_s']:5.2f} TB/s "
              f"({100 * row['bw_ratio']:.0f}% of copy), {row['tflop_s']:6.1f} TFLOP/s "
              f"({100 * row['mm_ratio']:.0f}% of matmul)", flush=True)


if __name__ == "__main__":
    main()
