"""The OpenAI-compatible server under concurrent streaming clients.

A server (``kimi_jax.serve``) on loopback serves a K2.5 cut of ``--layers`` layers with INT4
experts and random weights (``--tiny``: shrunk widths, for the CPU), at the real vocabulary
size: its tokenizer is synthetic (the 256 bytes, then byte pairs and triples as merges, then
K2.5's own special tokens and chat template), so the LM head and the sampling are full size.
For each client count C of ``--clients`` (1, 8, 32, 64), C clients with the official
``openai`` client each stream one chat completion of a ``--prompt``-token random prompt and
``--new`` tokens (greedy; a random model rarely writes a stop id); the server has ``max(C)``
slots. Measured per row: output tokens per second over the whole wave, time to first token
and inter-token latency (p50, p99, from the clients' view), after a warm-up wave.

    PYTHONPATH=benchmarks python benchmarks/serve.py [--tiny] [--layers 8] [--clients 1 8 32 64]

Each row is printed and appended to ``benchmarks/results/serve.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import openai
import uvicorn
from floors import RESULTS, device_name, record

from kimi_jax.chat.tokenizer import NUM_SPECIAL_TOKENS, Tokenizer
from kimi_jax.config.model import KimiConfig, builtin_config_dir
from kimi_jax.serve import create_app
from kimi_jax.testing.models import random_model

TINY = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32)


def config(layers: int, tiny: bool) -> KimiConfig:
    raw = json.loads((builtin_config_dir("kimi-k2.5") / "config.json").read_text())["text_config"]
    raw["num_hidden_layers"] = layers
    if tiny:
        raw.update(TINY)
    return KimiConfig.from_dict(raw)


def synthetic_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """A byte-level tokenizer of ``vocab_size`` ids laid out like K2.5's (its special tokens and template)."""
    base = vocab_size - NUM_SPECIAL_TOKENS
    pairs = (bytes([a, b]) for a, b in itertools.product(range(256), repeat=2))
    triples = (bytes([a, b, c]) for a, b, c in itertools.product(range(256), repeat=3))
    ranks = [bytes([b]) for b in range(256)] + list(itertools.islice(itertools.chain(pairs, triples), base - 256))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    real = builtin_config_dir("kimi-k2.5")
    for name in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        shutil.copy2(real / name, folder / name)
    return Tokenizer.from_dir(folder)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def one_client(client: openai.AsyncOpenAI, prompt: str, new: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between token chunks, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first, times, tokens = None, [], 0
    stream = await client.chat.completions.create(
        model="kimi-k2.5", messages=[{"role": "user", "content": prompt}], max_tokens=new, temperature=0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content or getattr(delta, "reasoning_content", None):
                now = time.perf_counter()
                first = first or now
                times.append(now)
    return (first or time.perf_counter()) - start, list(np.diff(times)), tokens


async def wave(base_url: str, prompts: list[str], new: int) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, p, new) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 2), "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 2),
            "itl_p50_ms": round(1e3 * percentile(gaps, 50), 2), "itl_p99_ms": round(1e3 * percentile(gaps, 99), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="shrunk widths (CPU smoke run)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (random text)")
    p.add_argument("--new", type=int, default=128, help="tokens per reply")
    p.add_argument("--out", default=str(RESULTS / "serve.jsonl"))
    args = p.parse_args()

    cfg = config(args.layers, args.tiny)
    tokenizer = synthetic_tokenizer(Path(tempfile.mkdtemp(prefix="kimi-jax-serve-bench-")), cfg.text.vocab_size)
    model = random_model(cfg, dtype=jnp.bfloat16, expert_format="int4")
    slots = max(args.clients)
    length = -(-(args.prompt + args.new + 64) // 128) * 128
    app = create_app(model, tokenizer, max_slots=slots, max_length=length, prefill_chunk=256, max_queue=slots)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "kimi", "model", "serve", "token", "cache", "slot"]

    def tokens_of(text: str) -> int:
        return len(tokenizer.encode(tokenizer.chat_template.render([{"role": "user", "content": text}])))

    def prompt(i: int) -> str:  # random words, at most --prompt tokens in the chat template
        text = f"{i}:"
        while tokens_of(longer := f"{text} {rng.choice(words)}") <= args.prompt:
            text = longer
        return text

    try:
        asyncio.run(wave(base_url, [prompt(i) for i in range(min(slots, 4))], 8))  # compile
        for clients in args.clients:
            asyncio.run(wave(base_url, [prompt(i) for i in range(clients)], 8))  # warm this batch mix
            row = asyncio.run(wave(base_url, [prompt(i) for i in range(clients)], args.new))
            row = record(args.out, bench="serve", layers=args.layers, tiny=args.tiny, clients=clients,
                         prompt_tokens=args.prompt, new=args.new, slots=slots, **row)
            print(json.dumps(row), flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.server.worker.stop()
    print(f"device: {device_name()}")


if __name__ == "__main__":
    main()
