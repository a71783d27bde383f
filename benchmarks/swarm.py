"""Agent Swarm against one-by-one: N sub-agents decoded together through one engine versus
the same sub-agents run one after another through the same engine.

Every sub-agent has the same system prompt and tool declaration (the calculator), its own
task, one reply of exactly ``--new`` tokens (no stop ids: fixed-length sub-tasks) and random
weights: a K2.5 cut of ``--layers`` layers with INT4 experts, or with ``--tiny`` shrunk
widths (CPU). The vocabulary is cut to 1024 ids so that the small byte-level tokenizer of
``kimi_jax.testing.demo`` covers it. Both ways are warmed up first (compilation excluded).

    PYTHONPATH=benchmarks python benchmarks/swarm.py [--tiny] [--layers 8] [--n 8 32 64] [--new 32]

Each row (wall seconds, engine steps, speedup) is printed and appended to
``benchmarks/results/swarm.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
from floors import RESULTS, device_name, record

from kimi_jax.agents import Agent, calculator
from kimi_jax.config.model import KimiConfig, builtin_config_dir
from kimi_jax.inference.engine import Engine
from kimi_jax.testing.demo import write_tokenizer
from kimi_jax.testing.models import random_model

VOCAB = 1024
TINY = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32)
SYSTEM = "You are a sub-agent of a wide search. Answer your sub-task with the tools you need."


def config(layers: int, tiny: bool) -> KimiConfig:
    raw = json.loads((builtin_config_dir("kimi-k2.5") / "config.json").read_text())["text_config"]
    real_vocab = raw["vocab_size"]
    raw.update(num_hidden_layers=layers, vocab_size=VOCAB, **(TINY if tiny else {}))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # special ids keep their place at the end
        raw[key] = VOCAB - (real_vocab - raw[key])
    return KimiConfig.from_dict(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="shrink the widths (CPU run)")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32, 64], help="sub-agents")
    parser.add_argument("--new", type=int, default=32, help="tokens of each sub-agent's reply")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    parser.add_argument("--out", default=str(RESULTS / "swarm.jsonl"))
    args = parser.parse_args()

    cfg = config(args.layers, args.tiny)
    t0 = time.perf_counter()
    model = random_model(cfg, dtype=jnp.float32 if args.tiny else jnp.bfloat16,
                         expert_format="dense" if args.tiny else "int4")
    print(f"{device_name()}, jax {jax.__version__}: random {args.layers}-layer model in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    folder = write_tokenizer(tempfile.mkdtemp(prefix="swarm-tokenizer-"), VOCAB)
    for n in args.n:
        engine = Engine(model, max_slots=n, max_length=1024, prefill_chunk=args.chunk)
        agent = Agent(engine, [calculator], tokenizer=folder, system=SYSTEM, max_steps=1, max_new_tokens=args.new,
                      temperature=0.0, stop_ids=())
        tasks = [f"Sub-task {i}: find the population of city number {i} and its growth since {1950 + i}."
                 for i in range(n)]
        agent.run_many(tasks[:2])  # compile the decode and prefill steps
        engine.reset()

        t0 = time.perf_counter()
        together = agent.run_many(tasks)
        swarm_s, swarm_steps = time.perf_counter() - t0, together[0].engine_steps
        reused = engine.stats()["reused_tokens"]
        engine.reset()
        t0 = time.perf_counter()
        alone = [agent.run(task) for task in tasks]
        one_by_one_s, one_by_one_steps = time.perf_counter() - t0, sum(r.engine_steps for r in alone)
        print(record(args.out, bench="swarm", layers=args.layers, tiny=args.tiny, subagents=n,
                     new_tokens=args.new, prompt_tokens=together[0].steps[0].prompt_tokens, swarm_s=round(swarm_s, 3),
                     one_by_one_s=round(one_by_one_s, 3), speedup=round(one_by_one_s / swarm_s, 2),
                     swarm_engine_steps=swarm_steps, one_by_one_engine_steps=one_by_one_steps,
                     swarm_reused_prompt_tokens=reused,
                     same_transcripts=[r.messages for r in together] == [r.messages for r in alone]), flush=True)
        del engine


if __name__ == "__main__":
    main()
