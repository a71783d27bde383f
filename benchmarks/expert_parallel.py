"""The expert-parallel exchanges at Kimi K2.5's sizes on one accelerator: ``ragged`` against ``bucket``.

A mesh of one device on an ``expert`` axis, so the collectives of
``kimi_jax.parallel.expert.expert_parallel_moe`` run (between one participant) but move
nothing between devices: this checks the ragged path on a GPU and times its overhead, not
multi-GPU communication. 384 routed experts of 7168 x 2048 (bf16 SwiGLU through
``kimi_jax.kernels.grouped.ragged_dot``, backend ``auto``; random weights), top-8 of random
router scores. For each token count it prints the largest difference between the two
exchanges (relative to the largest output), the median ms of one jitted call of each and the
receive-buffer bytes per device (ragged: the R-row buffer; bucket: the received buckets plus
that buffer; ``kimi_jax.parallel.expert.buffer_rows``, no capacity).

    PYTHONPATH=. python benchmarks/expert_parallel.py [--tokens 64 512 4096]

Rows are appended to ``benchmarks/results/expert_parallel.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from floors import RESULTS, device_name, median_seconds, record
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from kimi_jax.kernels.grouped import ragged_dot
from kimi_jax.parallel.expert import buffer_rows, expert_parallel_moe

D_MODEL, D_EXPERT, N_EXPERTS, TOP_K = 7168, 2048, 384, 8


def random_experts(key: jax.Array, mesh) -> dict:
    """bf16 gate / up [E, D, F] and down [E, F, D], drawn one block of experts at a time."""

    def stack(key, shape, scale):
        draw = jax.jit(lambda k: jax.lax.map(lambda k: (jax.random.normal(k, shape) * scale).astype(jnp.bfloat16),
                                             jax.random.split(k, N_EXPERTS), batch_size=16),
                       out_shardings=NamedSharding(mesh, PartitionSpec("expert")))
        return draw(key)

    k1, k2, k3 = jax.random.split(key, 3)
    return {"gate": stack(k1, (D_MODEL, D_EXPERT), D_MODEL**-0.5), "up": stack(k2, (D_MODEL, D_EXPERT), D_MODEL**-0.5),
            "down": stack(k3, (D_EXPERT, D_MODEL), D_EXPERT**-0.5)}


def swiglu(w: dict, rows: jax.Array, ids: jax.Array) -> jax.Array:
    """The local experts (``LocalExperts``): rows sorted by expert, ids past the experts in no group."""
    sizes = jnp.bincount(ids, length=w["gate"].shape[0] + 1)[:-1].astype(jnp.int32)
    h = jax.nn.silu(ragged_dot(rows, w["gate"], sizes)) * ragged_dot(rows, w["up"], sizes)
    return ragged_dot(h, w["down"], sizes)


def routing(key: jax.Array, tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bf16 tokens [T, D], their top-8 experts of random scores [T, K] and softmax weights."""
    kx, ks = jax.random.split(key)
    x = jax.random.normal(kx, (tokens, D_MODEL), jnp.bfloat16)
    top, idx = jax.lax.top_k(jax.random.normal(ks, (tokens, N_EXPERTS)), TOP_K)
    return x, idx.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS / "expert_parallel.jsonl"))
    args = parser.parse_args()

    mesh = jax.make_mesh((1,), ("expert",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    experts = random_experts(jax.random.key(0), mesh)
    specs = jax.tree.map(lambda _: PartitionSpec("expert"), experts)
    print(f"{device_name()}: {N_EXPERTS} experts of {D_MODEL} x {D_EXPERT} (bf16), top-{TOP_K}, expert axis of 1")
    for tokens in args.tokens:
        x, idx, weights = routing(jax.random.key(tokens), tokens)
        rows, bucket = buffer_rows(tokens, TOP_K, N_EXPERTS, 1, None)
        receive = {"ragged": rows * D_MODEL * 2, "bucket": (bucket + rows) * D_MODEL * 2}  # P = 1: one bucket
        outs, ms = {}, {}
        for exchange in ("ragged", "bucket"):
            moe = jax.jit(functools.partial(
                expert_parallel_moe, expert_specs=specs, local_experts=swiglu, mesh=mesh, n_experts=N_EXPERTS,
                expert_axes=("expert",), token_axes=(), hidden_axes=(), exchange=exchange,
            ))
            outs[exchange] = np.asarray(moe(x, idx, weights, experts), np.float32)
            ms[exchange] = median_seconds(moe, x, idx, weights, experts, iters=args.iters) * 1e3
        err = float(np.abs(outs["ragged"] - outs["bucket"]).max() / np.abs(outs["bucket"]).max())
        for exchange in ("ragged", "bucket"):
            row = record(args.out, bench="expert_parallel", tokens=tokens, exchange=exchange, devices=1,
                         ms=round(ms[exchange], 3), receive_bytes=receive[exchange], max_rel_err_vs_bucket=err)
            print(f"{tokens:5d} tokens  {exchange:6s}  {row['ms']:8.3f} ms  receive {receive[exchange] / 2**20:8.1f} MiB"
                  f"  max rel err {err:.2e}")


if __name__ == "__main__":
    main()
