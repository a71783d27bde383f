"""One train step of a K2.5-width cut on one accelerator: tokens/s and MFU.

The model: K2.5's real text config (hidden 7168; MLA with q_lora_rank 1536, kv_lora_rank
512, 64 heads, qk_nope 128, qk_rope 64, v_head 128; MoE with experts of 7168 x 2048, one
shared expert, sigmoid top-8 routing with its scaling factor 2.827) cut to 2 decoder
layers, both MoE, with ``--experts`` routed experts (default 32: one shard of K2.5's 384
under 12-way expert parallelism) in bf16 (``dense``, not INT4) and the real vocabulary
(``--vocab`` shrinks it); random weights, ``--dtype`` parameters. The step is the one
``kimi-jax train`` compiles: :class:`kimi_jax.train.step.Trainer` with its loss, ``--optimizer``
(AdamW or Muon), gradient checkpointing per layer (``--no-remat`` turns it off), random
tokens, every target trained.

In one run: the bf16 matmul rate (``floors.matmul_rate``), then for each ``--batch`` (in
ascending order, stopping at the first failure, e.g. out of memory) x ``--seq`` tokens:
the seconds to trace, lower and compile the Trainer's step, XLA's memory plan of the step
(arguments + outputs - donated + temporaries), the median wall time of ``--iters`` steps
after one warm-up step (each blocked on its metrics), tokens/s, model FLOP/s and MFU (over
the measured matmul rate; floors has no nominal peak to compare with), and the device's
memory in use, peak and limit where it reports them (the peak includes building the
Trainer, which copies the whole train state once).

Model FLOPs per step (the convention of PaLM's MFU; what is executed is more: the remat
forward again, the full T x T scores behind the causal mask, the router in float32; the
optimizer, e.g. Muon's Newton-Schulz iterations, is not counted):

    6 x tokens x active + 3 x layers x heads x (qk_nope + qk_rope + v_head) x batch x seq^2

with ``active`` the matmul weights one token uses: per layer the MLA projections (q_a, q_b,
kv_a, kv_b, o), the router, 8 routed + 1 shared expert of 3 x 7168 x 2048; and the lm_head
(the embedding is a lookup). The second term is causal attention: scores and values,
forward and backward, over seq^2 / 2 query-key pairs per sequence.

GPU memory at the defaults (5.46 B parameters: 2.35 B embedding + lm_head, 1.55 B per
layer, 1.41 B of it routed experts): bf16 parameters 10.9 GB; AdamW's two moments, in the
parameters' dtype, 21.8 GB (Muon: one moment for the matrices, AdamW's two for the
embedding and lm_head, 15.6 GB); gradients 10.9 GB; no float32 master copy. The Trainer
also keeps the arrays it was built from (the model and the initial optimizer state) beside
its own copy; this script frees them (32.8 GB with AdamW; building the Trainer needs both
copies for a moment, 65.6 GB, which the reported peak includes). On top of those ~44 GB, per
2048-token sequence of ``--batch``: the per-layer checkpoints are small; the float32 logits
(1.3 GB a copy) and the attention scores of the layer in the backward pass (64 x 2048^2
float32, 1.1 GB a copy) come in a few copies; the routed experts' 16384 row copies take
0.23 GB a copy in a grouped kernel, but stock ``jax.lax.ragged_dot`` on GPUs materializes
one product per expert ([experts, rows, outputs] bf16: up to 7.5 GB at 32 experts, and
``experts`` times the routed experts' FLOPs). So about 5 GB per sequence with a grouped
kernel (batch 4 should fit an 80 GB H100, 8 not) and 15-25 GB with stock ``ragged_dot``
(batch 1 should fit, 2 is doubtful). Larger batches are tried and recorded if they fail. Run
with ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` (JAX takes 75% of the memory by default).

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python benchmarks/train_step.py \\
        [--experts 32] [--vocab 163840] [--batch 1 2 4 8] [--seq 2048] [--optimizer adamw] [--tiny]

Rows are appended to ``benchmarks/results/train_step.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from floors import RESULTS, device_name, matmul_rate, record

from kimi_jax.config.model import KimiConfig, TextConfig
from kimi_jax.testing.models import random_model
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config
from kimi_jax.train.optim import OPTIMIZERS, OptimizerConfig
from kimi_jax.train.step import StepConfig, Trainer


def model_flops(cfg: TextConfig, batch: int, seq: int) -> tuple[int, int]:
    """Model FLOPs of one train step on ``batch`` x ``seq`` tokens and the active matmul
    weights per token (see the module docstring)."""
    D, N, C = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    H, R, V = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = D * N * (H + R) if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank * N * (H + R)
    attn = q + D * (C + R) + C * N * (H + V) + N * V * D
    moe = D * cfg.n_routed_experts + 3 * D * (cfg.num_experts_per_tok * cfg.moe_intermediate_size
                                              + cfg.shared_intermediate_size)
    L = cfg.num_hidden_layers
    active = sum(attn + (moe if cfg.is_moe_layer(i) else 3 * D * cfg.intermediate_size) for i in range(L))
    active += D * cfg.vocab_size
    return 6 * batch * seq * active + 3 * L * N * (H + R + V) * batch * seq**2, active


def gigabytes(tree) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(tree)) / 1e9


def device_memory() -> dict[str, float]:
    """The device's memory in use, its peak since the start (building the Trainer included)
    and its limit, in GB, as far as it reports them."""
    stats = jax.devices()[0].memory_stats() or {}
    names = {"bytes_in_use": "in_use_gb", "peak_bytes_in_use": "peak_gb", "bytes_limit": "limit_gb"}
    return {name: round(stats[key] / 1e9, 2) for key, name in names.items() if key in stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=32, help="routed experts per layer (K2.5: 384)")
    parser.add_argument("--vocab", type=int, default=163840)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="sequences per step, tried in ascending order until one fails")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; --tiny: 128)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--dtype", default="bfloat16", help="parameter dtype")
    parser.add_argument("--no-remat", action="store_true", help="keep every layer's activations")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tiny", action="store_true",
                        help="the test models' widths (TINY_TEXT, 16 experts, vocab 512; CPU smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "train_step.jsonl"))
    args = parser.parse_args()
    seq = args.seq or (128 if args.tiny else 2048)

    rate = matmul_rate(1024 if args.tiny else 8192)
    print(f"{device_name()}, jax {jax.__version__}: bf16 matmul {rate / 1e12:.1f} TFLOP/s", flush=True)

    text = {"n_routed_experts": args.experts, "vocab_size": args.vocab}
    if args.tiny:
        text.update(TINY_TEXT)
    text.update(num_hidden_layers=2, first_k_dense_replace=0)
    config = KimiConfig.from_dict(k25_config(text, multimodal=False))
    cfg = config.text
    t0 = time.perf_counter()
    model = random_model(config, dtype=jnp.dtype(args.dtype), expert_format="dense")
    trainer = Trainer(model, OptimizerConfig(name=args.optimizer), StepConfig(remat=not args.no_remat))
    del model
    jax.block_until_ready(trainer.state)
    params, opt = gigabytes(trainer.state["model"]), gigabytes(trainer.state["optimizer"])
    n_params = sum(x.size for x in jax.tree.leaves(trainer.state["model"]))
    print(f"{n_params:,} parameters ({params:.3g} GB), {args.optimizer} state {opt:.3g} GB, built in "
          f"{time.perf_counter() - t0:.1f}s; device memory: {device_memory() or 'n/a'}", flush=True)
    common = dict(layers=cfg.num_hidden_layers, experts=cfg.n_routed_experts, vocab=cfg.vocab_size, seq=seq,
                  optimizer=args.optimizer, dtype=args.dtype, remat=not args.no_remat, tiny=args.tiny,
                  params=n_params, params_gb=round(params, 2), optimizer_gb=round(opt, 2),
                  matmul_tflop_s=round(rate / 1e12, 1))

    rng = np.random.default_rng(0)
    for batch in sorted(args.batch):
        tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1))
        data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch, seq), np.float32),
                "valid": np.ones((batch, seq), bool)}
        flops, active = model_flops(cfg, batch, seq)
        try:
            t0 = time.perf_counter()
            # The Trainer's own jitted step, compiled ahead of its first call (which reuses it).
            plan = trainer.lower(data).compile().memory_analysis()
            compile_s = time.perf_counter() - t0
            trainer.step(data)
            times, losses = [], []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                losses.append(trainer.step(data)["loss"])
                times.append(time.perf_counter() - t0)
        except Exception as e:  # out of memory: recorded; the donated train state may be gone, so stop
            message = str(e).splitlines()[0][:300]
            print(f"batch {batch} x {seq}: failed: {type(e).__name__}: {message}", flush=True)
            record(args.out, batch=batch, error=message, **common)
            break
        seconds = statistics.median(times)
        planned = None if plan is None else (plan.argument_size_in_bytes + plan.output_size_in_bytes
                                             - plan.alias_size_in_bytes + plan.temp_size_in_bytes) / 1e9
        row = record(
            args.out, batch=batch, tokens=batch * seq, step_s=round(seconds, 4), compile_s=round(compile_s, 1),
            tokens_per_s=round(batch * seq / seconds, 1), active_params=active, model_flop=flops,
            tflop_s=round(flops / seconds / 1e12, 3), mfu_vs_matmul=round(flops / seconds / rate, 4),
            step_memory_gb=None if planned is None else round(planned, 2),
            temp_gb=None if plan is None else round(plan.temp_size_in_bytes / 1e9, 2),
            **device_memory(), loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), **common,
        )
        print(f"batch {batch} x {seq}: {seconds * 1e3:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
              f"{row['tflop_s']:.4g} TFLOP/s, MFU {100 * row['mfu_vs_matmul']:.1f}% of the matmul rate, "
              f"compile {compile_s:.1f}s, step memory {row['step_memory_gb']} GB (temporaries {row['temp_gb']} GB), "
              f"device memory: {device_memory() or 'n/a'}, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)


if __name__ == "__main__":
    main()
