"""The serving engine on one accelerator: decode against its floor, batching, arrivals, compile time, MLA.

In one run, after measuring the memory bandwidth:

1. ``decode-1`` / ``decode-N``: ms per decode step of a K2.5 cut (``--layers``, INT4
   experts, random weights) with 1 and N running sequences, steps dispatched back to back
   (and, beside it, blocked on one by one), against the floor of the step
   (bytes it must read: the non-expert weights, the distinct experts per MoE layer that the
   sequences' last prompt tokens are routed to (``experts_per_layer``; the random cut routes
   more narrowly than uniform routing, ``uniform_experts_per_layer``), the cache; over the
   bandwidth);
2. ``arrivals``: ``--requests`` prompts of ``--prompt`` tokens arriving one every
   ``--every`` steps: throughput, time to first token and inter-token latency (p50, p99,
   mean; the tokens of a decode burst arrive together, so the mean is the rate),
   programs compiled after the engine's warm-up (``Engine.warm_up``; any compilation in the
   process counts);
3. ``mla``: absorbed MLA attention of one layer over 4K, 32K and 128K cached tokens at
   batch 1 and 32, against reading its cache and weights once: ms per call blocked on one
   by one (the host's dispatch included) and, on a GPU, the kernels' busy time per call
   from a profile (``device_ms``: what the layer costs inside a step);
4. ``compile``: seconds to compile the decode step of the cut and of the whole 61-layer
   model (abstract weights, no memory).

(Measured in the order 1, 3, 2, 4: compiling last, as it clears jax's caches, which the
engines share; each row is written as soon as it is measured.)

    PYTHONPATH=. python benchmarks/engine.py [--layers 8] [--slots 64] [--tiny]

The 8-layer cut's weights take 69 GiB: on an 80 GB card let the client have the memory
(``XLA_PYTHON_CLIENT_MEM_FRACTION=0.97``; jax takes 75% by default).

Each measurement is printed and appended to ``benchmarks/results/engine.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from floors import RESULTS, device_name, median_seconds, memory_bandwidth, record
from kernel_times import device_seconds

from kimi_jax.checkpoint.summary import device_bytes
from kimi_jax.config.model import KimiConfig, builtin_config_dir
from kimi_jax.inference.engine import Engine, SlotState, decode_step
from kimi_jax.inference.steps import key_block_for
from kimi_jax.model.cache import KVCache, LayerCache
from kimi_jax.model.mla import MLA
from kimi_jax.testing.compiles import compilations
from kimi_jax.testing.models import random_model

TINY = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, vocab_size=1024,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def text_config(layers: int, tiny: bool) -> KimiConfig:
    raw = json.loads((builtin_config_dir("kimi-k2.5") / "config.json").read_text())["text_config"]
    raw["num_hidden_layers"] = layers
    if tiny:
        raw.update(TINY)
    return KimiConfig.from_dict(raw)


def step_floor_bytes(config: KimiConfig, tokens: int, cached: int, touched: float | None = None) -> float:
    """Bytes one decode step of ``tokens`` sequences with ``cached`` tokens each must read: the
    weights but the embedding (one row per token) and the routed experts, the distinct
    experts per MoE layer (``touched``; default the mean under uniform routing, the planner's
    count, ``kimi_jax.plan``), the cache."""
    cfg = config.text
    sizes = device_bytes(config, jnp.bfloat16, "int4")
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    if touched is None:
        touched = uniform_experts(E, K, tokens)
    experts = sizes["routed_experts"] * touched / E
    rows = tokens * cfg.hidden_size * 2
    cache = tokens * cached * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    return sum(sizes.values()) - sizes["routed_experts"] - sizes["embedding"] + rows + experts + cache


def uniform_experts(E: int, K: int, tokens: int) -> float:
    """The mean distinct experts per MoE layer of ``tokens`` tokens routed uniformly."""
    return E * (1 - (1 - K / E) ** tokens)


def routed_experts(model, prompts: list[list[int]], chunk: int = 8) -> float:
    """The distinct experts per MoE layer (mean over the layers) that the prompts' last tokens
    are routed to: what a decode step of these sequences reads, where the random model's
    routing is narrower than uniform (it is, in the deeper layers of a cut).

    The prompts (of one length) are prefilled as the engine prefills, by the cached step that
    reads the INT4 experts in place, with the routers' choices captured."""
    cfg = model.config.text
    lm = model.language_model
    lm.set_attributes(capture=True, raise_if_not_found=False)
    graphdef, state = nnx.split(lm)
    lm.set_attributes(capture=False, raise_if_not_found=False)

    @jax.jit  # over the split state: nnx.jit would return the state it changed (sown), a copy of every weight
    def last_routes(state, ids):
        B, T = ids.shape
        cache = KVCache.create(cfg, B, T)
        block = key_block_for(cfg, B, T, T, None)
        _, sown = nnx.capture(lambda lm: lm.extend(ids, jnp.full((B,), T, jnp.int32), cache, absorbed=True,
                                                   key_block=block), nnx.Intermediate)(nnx.merge(graphdef, state))
        return [var.get_value()[0].reshape(-1, B, T, cfg.num_experts_per_tok)[:, :, -1]  # [layers, B, K]
                for path, var in nnx.to_flat_state(sown) if path[-1] == "router_idx"]

    chosen = collections.defaultdict(set)
    for i in range(0, len(prompts), chunk):
        for run, idx in enumerate(last_routes(state, jnp.asarray(prompts[i:i + chunk], jnp.int32))):
            for layer, per_layer in enumerate(np.asarray(idx)):
                chosen[run, layer].update(per_layer.ravel().tolist())
    return float(np.mean([len(s) for s in chosen.values()]))


def warm_engine(model, args) -> Engine:
    """A new engine on ``model`` with every step compiled (``compile`` clears jax's caches)."""
    engine = Engine(model, max_slots=args.slots, max_length=args.length, prefill_chunk=args.chunk)
    t0 = time.perf_counter()
    engine.warm_up()
    print(f"engine warm-up in {time.perf_counter() - t0:.1f}s", flush=True)
    return engine


def decode_ms(engine: Engine, prompts: list[list[int]], new: int) -> tuple[float, float] | None:
    """Ms per decode step (one token per sequence) while every prompt's request is decoding:
    the steady rate (steps dispatched back to back: the engine overlaps the host's work with
    the device's, and runs ``decode_burst`` steps per dispatch when nothing else is scheduled)
    and the rate when each ``Engine.step`` is blocked on (host and device times added). Rates
    are measured between points where the host has read a step's tokens, over a window of
    tokens of the first request; None if too few steps had every request decoding (``new``
    too small for the prompts' prefill steps)."""
    requests = [engine.submit(p, max_new_tokens=new) for p in prompts]
    while not all(r.token_ids for r in requests):
        engine.step()
    for _ in range(2):
        engine.step()
    window = (new - max(len(r.token_ids) for r in requests)) // 2 - engine.decode_burst
    if window < 2:
        return None

    def rate(blocked: bool) -> float:
        first = requests[0].token_ids
        start, t0 = len(first), time.perf_counter()
        while len(first) - start < window:
            engine.step()
            if blocked:
                jax.block_until_ready(engine._slots.last)
        return (time.perf_counter() - t0) / (len(first) - start)

    steady, blocked = rate(False), rate(True)
    assert not any(r.done for r in requests), "a request ended while timed"
    engine.run()
    return 1e3 * steady, 1e3 * blocked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--length", type=int, default=2304, help="cache tokens per slot")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens of the arrivals workload")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--every", type=int, default=2, help="steps between arrivals")
    parser.add_argument("--new", type=int, default=32, help="tokens generated per request of the arrivals")
    parser.add_argument("--decode-new", type=int, default=192,
                        help="tokens generated per request of decode-1 / -N (the timed window: about half, after prefill)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "arrivals", "compile", "mla"])
    parser.add_argument("--tiny", action="store_true", help="shrink the widths (CPU smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "engine.jsonl"))
    args = parser.parse_args()

    bw = memory_bandwidth(1 << 24 if args.tiny else 2 << 30)
    print(f"{device_name()}, jax {jax.__version__}: memory bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    common = dict(layers=args.layers, tiny=args.tiny, bandwidth_tb_s=round(bw / 1e12, 3))
    config = text_config(args.layers, args.tiny)
    rng = np.random.default_rng(0)
    V = config.text.vocab_size

    if "decode" not in args.skip or "arrivals" not in args.skip:
        t0 = time.perf_counter()
        model = random_model(config, expert_format="int4")
        jax.block_until_ready(nnx.state(model))
        print(f"random {args.layers}-layer model in {time.perf_counter() - t0:.1f}s", flush=True)

    if "decode" not in args.skip:
        engine = warm_engine(model, args)
        short = 128
        single = {}  # batch -> (ms per step, floor ms)
        for batch in (1, args.slots):
            prompts = [rng.integers(0, V, short).tolist() for _ in range(batch)]
            timed = decode_ms(engine, prompts, args.decode_new)
            if timed is None:
                print(f"decode-{batch}: too few steps with every request decoding; raise --new", flush=True)
                continue
            ms, blocked = timed
            cfg = config.text
            uniform = uniform_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)
            touched = routed_experts(model, prompts) if batch > 1 else uniform  # one token: K distinct
            floor = step_floor_bytes(config, batch, short + args.decode_new // 2, touched) / bw * 1e3
            # against batch 1: the measured throughput ratio, and that of two steps at their floors
            # (each step can be no faster than its floor, so a batch-1 step within 1.3x of its floor
            # bounds the ratio by 1.3 times that)
            ratios = {} if batch == 1 or 1 not in single else dict(
                throughput_ratio=round(batch * single[1][0] / ms, 2),
                floor_throughput_ratio=round(batch * single[1][1] / floor, 2))
            single[batch] = (ms, floor)
            row = record(args.out, bench="decode", batch=batch, ms_per_step=round(ms, 3), floor_ms=round(floor, 3),
                         floor_ratio=round(floor / ms, 3), tokens_per_s=round(batch / ms * 1e3, 1),
                         blocked_ms_per_step=round(blocked, 3), slots=args.slots, experts_per_layer=round(touched, 1),
                         uniform_experts_per_layer=round(uniform, 1), **ratios, **common)
            print(row, flush=True)
        del engine

    if "mla" not in args.skip:
        cfg = config.text
        graphdef, weights_state = nnx.split(MLA(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        weights = sum(x.nbytes for x in jax.tree.leaves(weights_state))

        @functools.partial(jax.jit, static_argnames="block", donate_argnames="cache")
        def attend(state, x, cache, positions, block):  # the cache donated, as in the engine's step
            cos, sin = _rope(cfg, positions)
            return nnx.merge(graphdef, state).cached(x, cos, sin, positions, cache, jnp.int32(0), absorbed=True,
                                                     key_block=block)

        for cached in ((4096, 32768, 131072) if not args.tiny else (256, 1024)):
            for batch in (1, 32):
                C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
                key = jax.random.key(cached + batch)
                cache = LayerCache(jax.random.normal(key, (batch, 1, cached, C), jnp.bfloat16),
                                   jax.random.normal(key, (batch, 1, cached, R), jnp.bfloat16))
                x = jax.random.normal(key, (batch, 1, cfg.hidden_size), jnp.bfloat16)
                positions = jnp.full((batch, 1), cached - 1, jnp.int32)
                floor = (cache.c_kv.nbytes + cache.k_pe.nbytes + weights) / bw
                held = [cache]

                def call(block):
                    out, held[0] = attend(weights_state, x, held[0], positions, block)
                    return out

                # the engine's block size, and the whole cache scored at once
                for block in sorted({key_block_for(cfg, batch, 1, cached, None), cached}):
                    seconds = median_seconds(call, block)
                    busy = device_seconds(call, block)[0] if jax.default_backend() == "gpu" else None
                    on_device = {} if busy is None else dict(device_ms=round(busy * 1e3, 3),
                                                             device_floor_ratio=round(floor / busy, 3))
                    print(record(args.out, bench="mla", batch=batch, cached=cached, key_block=block,
                                 ms=round(seconds * 1e3, 3), floor_ms=round(floor * 1e3, 3),
                                 floor_ratio=round(floor / seconds, 3), **on_device, **common), flush=True)
                del cache, held

    if "arrivals" not in args.skip:
        prompts = [rng.integers(0, V, args.prompt).tolist() for _ in range(args.requests)]
        engine = warm_engine(model, args)
        submitted, stamps, requests = {}, {}, []
        t_start = time.perf_counter()
        step = 0
        with compilations() as compiled:
            while len(requests) < len(prompts) or not all(r.done for r in requests):
                if len(requests) < len(prompts) and step % args.every == 0:
                    r = engine.submit(prompts[len(requests)], max_new_tokens=args.new)
                    submitted[r.id], stamps[r.id] = time.perf_counter(), []
                    requests.append(r)
                engine.step()
                now = time.perf_counter()
                for r in requests:
                    while len(stamps[r.id]) < len(r.token_ids):
                        stamps[r.id].append(now)
                step += 1
        total = time.perf_counter() - t_start
        ttft = [stamps[r.id][0] - submitted[r.id] for r in requests]
        itl = [b - a for r in requests for a, b in zip(stamps[r.id], stamps[r.id][1:])]
        row = record(
            args.out, bench="arrivals", requests=args.requests, prompt=args.prompt, new=args.new, slots=args.slots,
            chunk=args.chunk, seconds=round(total, 2),
            output_tokens_per_s=round(sum(len(r.token_ids) for r in requests) / total, 1),
            prompt_tokens_per_s=round(args.requests * args.prompt / total, 1),
            ttft_p50_s=round(float(np.percentile(ttft, 50)), 3), ttft_p99_s=round(float(np.percentile(ttft, 99)), 3),
            itl_p50_ms=round(1e3 * float(np.percentile(itl, 50)), 2),
            itl_p99_ms=round(1e3 * float(np.percentile(itl, 99)), 2), itl_mean_ms=round(1e3 * float(np.mean(itl)), 2),
            compilations_after_warm_up=len(compiled), **common,
        )
        print(row, flush=True)
        del engine, model

    if "compile" not in args.skip:
        for layers in (args.layers, 61):
            cfg = text_config(layers, args.tiny)
            from kimi_jax.model.kimi import Kimi

            abstract = nnx.eval_shape(lambda: Kimi(cfg, dtype=jnp.bfloat16, expert_format="int4"))
            graphdef, state = nnx.split(abstract.language_model)
            slots = jax.eval_shape(
                lambda: SlotState.create(KVCache.create(cfg.text, args.slots, args.length), cfg.text.vocab_size)
            )
            block = key_block_for(cfg.text, args.slots, 1, args.length, None)
            jax.clear_caches()  # measure a cold compile, not the engine's cached one
            t0 = time.perf_counter()
            decode_step.lower(graphdef, state, slots, np.arange(args.slots, dtype=np.int32), key_block=block).compile()
            seconds = time.perf_counter() - t0
            print(record(args.out, bench="compile", model_layers=layers, compile_s=round(seconds, 2), **common),
                  flush=True)


def _rope(cfg, positions):
    from kimi_jax.model.layers import rope_attention_factor, rope_table, yarn_inv_freq

    return rope_table(positions, jnp.asarray(yarn_inv_freq(cfg)), rope_attention_factor(cfg))


if __name__ == "__main__":
    main()
