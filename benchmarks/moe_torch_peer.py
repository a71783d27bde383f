"""The peer of ``benchmarks/moe.py``: transformers' ``DeepseekV3MoE`` at Kimi K2.5 sizes on one GPU.

384 routed experts of 7168 x 2048 (top 8), one shared expert, bf16 weights and activations,
the experts run through ``torch`` grouped matmuls (``experts_implementation="grouped_mm"``).
Times one forward per token count with CUDA events (median of ``--iters`` after a warm-up) and
appends rows (``impl`` ``transformers-grouped_mm``, ``experts`` ``bf16``) to the same JSON
lines file as the JAX benchmark, so RESULTS.md can put them side by side. Run it in its own
process after ``moe.py`` (JAX holds most of the GPU's memory while it runs).

    python benchmarks/moe_torch_peer.py [--tokens 1 8 64 256 4096] [--out results/moe.jsonl]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 4096])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "moe.jsonl"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_torch_peer: needs a CUDA GPU")

    cfg = DeepseekV3Config(
        hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=384, num_experts_per_tok=8,
        n_shared_experts=1, n_group=1, topk_group=1, experts_implementation="grouped_mm",
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        moe = DeepseekV3MoE(cfg).eval()
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
    gpu = torch.cuda.get_device_name()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}: DeepseekV3MoE grouped_mm")
    for t in args.tokens:
        x = torch.randn(1, t, cfg.hidden_size, device="cuda")
        times = []
        with torch.inference_mode():
            moe(x)
            for _ in range(args.iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                moe(x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        row = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
               "transformers": transformers.__version__, "tokens": t, "experts": "bf16",
               "impl": "transformers-grouped_mm", "ms": round(ms, 4)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{t:>6} tokens {ms:9.3f} ms", flush=True)


if __name__ == "__main__":
    main()
