"""Expert parallelism: routed experts split over a mesh axis, tokens sent to their experts.

Einsum letters: T tokens (of one data shard), K chosen experts per token, D model, E experts,
P devices on the expert axis, R rows of a device's receive buffer, C rows of a bucket.

Inside ``jax.shard_map`` each device holds ``E / P`` experts (and, with tensor parallelism,
a slice of each expert's hidden dimension). A device's tokens are split evenly over the
devices of its expert axis (``Ts = ceil(T / P)`` each); each device then

1. sorts its ``Ts * K`` token copies (token, chosen expert) by expert, hence by owning
   device, and counts them per expert (:func:`route_tokens`);
2. all-gathers the counts over the expert axis ([P, E] int32); from them every device
   derives, with no further communication, how many rows each device sends each other,
   where they land in the receiver's buffer (senders in axis order, each sender's rows by
   expert) and the local expert of every received row (:func:`exchange_plan`);
3. sends exactly its rows into their owners' receive buffers of R rows (the exchange);
4. runs the received rows, sorted by local expert, through its local experts; rows past
   the received count belong to no expert (:func:`run_local_experts`); partial results are
   summed over the tensor axis when expert hidden dimensions are split;
5. sends the results back with the reverse exchange into the slots the rows came from,
   combines each token's K results with its router weights (float32, :func:`combine`) and
   all-gathers the tokens over the expert axis.

Exchanges (``exchange=``):

- ``ragged``: ``jax.lax.ragged_all_to_all`` (GPU, TPU; XLA:CPU does not implement it). Only
  the real rows travel.
- ``bucket``: ``all_to_all`` of P buckets of C rows per device (:func:`bucket_exchange`),
  then the received rows are written into the same R-row layout as ``ragged``. Runs on
  every backend. The buckets are still worst case: C = min(Ts * min(K, E/P), R), the most
  one device can send another, so P * C rows are sent and received each way whatever the
  counts.
- ``auto``: ``bucket``. On one H100 (a one-device expert axis, K2.5 sizes) the ragged
  exchange took 11.5 / 56.7 / 373 ms at 64 / 512 / 4096 tokens against 9.6 / 15.8 / 25.7 ms
  for ``bucket`` (``benchmarks/expert_parallel.py``), so ``ragged`` is chosen explicitly
  until multi-GPU measurements show where it pays.

Receive rows (:func:`buffer_rows`). A device receives at most min(K, E/P) copies of each of
its data shard's T tokens, so R = T * min(K, E/P) never drops a copy (the default,
``capacity=None``); when K <= E/P (K2.5's 384 experts on up to 48 devices) that is P times
the mean T * K / P. ``capacity=c`` sets R = min(ceil(c * T * K / P), T * min(K, E/P)).
Copies past R rows on a device are dropped (they contribute 0): lower sender indices keep
their rows first, each sender's rows in expert order. The dropped copies are counted
exactly from the gathered counts, and with a ``capacity`` :func:`expert_parallel_moe`
returns that count beside its output, so a caller cannot use a capacity and miss its drops.

Memory per device for one call (b bytes per element of x): the sorted copies and the
returned results, 2 * Ts * K * D * b; the receive buffer R * D * b, and three more arrays
of R * D * b (the rows sorted by expert, the experts' outputs, those unsorted); the float32
combine, Ts * K * D * 4; the counts, P * E * 4. ``bucket`` adds four arrays of
P * C * D * b (sent and received buckets, each way). The local experts run over R rows, of
which about T * K / P are real on balanced routing; whether the rest cost time depends on
the grouped matmul (XLA's ``ragged_dot`` computes them; the INT4 Pallas kernel only writes
zeros there).
Example, K2.5 (D = 7168, K = 8, bf16) on P = 8 devices, T = 4096: Ts = 512, the no-drop
receive buffer is R = 32768 rows, 470 MB; ``capacity=2`` gives R = 8192, 117 MB.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

LocalExperts = Callable[[object, jax.Array, jax.Array], jax.Array]
"""``(local expert state, rows [M, D], local expert id [M]) -> [M, D]``: the local experts'
outputs for rows sorted by local expert id; rows whose id is the number of local experts
belong to no expert (their outputs are discarded)."""

EXCHANGES = ("auto", "ragged", "bucket")
RAGGED_PLATFORMS = ("gpu", "tpu")
"""Platforms whose XLA backend implements ``jax.lax.ragged_all_to_all``."""


def _axes(names: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not names else names[0] if len(names) == 1 else names


def choose_exchange(exchange: str, platform: str | None) -> str:
    """The exchange ``ragged`` or ``bucket`` that ``exchange`` means on ``platform`` (None: not
    known yet, an abstract mesh);
    ``ValueError`` for an unknown one, or ``ragged`` where XLA does not implement it."""
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown expert-parallel exchange {exchange!r}; choose from {EXCHANGES}")
    if exchange == "auto":
        return "bucket"
    if exchange == "ragged" and platform is not None and platform not in RAGGED_PLATFORMS:
        raise ValueError(
            f"exchange='ragged' needs jax.lax.ragged_all_to_all, which XLA does not implement for platform "
            f"{platform!r} (only {', '.join(RAGGED_PLATFORMS)}); use exchange='bucket' or 'auto'"
        )
    return exchange


def buffer_rows(tokens: int, top_k: int, n_experts: int, devices: int, capacity: float | None) -> tuple[int, int]:
    """(R, C): rows of one device's receive buffer and of one bucket, for ``tokens`` per data
    shard split over ``devices`` on the expert axis. ``capacity`` None: R never drops;
    otherwise R is ``capacity`` times the mean rows per device, at most the no-drop bound."""
    per_token = min(top_k, n_experts // devices)  # a token's copies reaching one device
    rows = tokens * per_token
    if capacity is not None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        rows = min(rows, max(1, math.ceil(capacity * tokens * top_k / devices)))
    return rows, min(-(-tokens // devices) * per_token, rows)


COMPARED_COPIES = 1024
"""Token copies up to which :func:`group_by_expert` ranks by comparing every pair (a few fused
elementwise reductions) instead of sorting: on GPUs XLA's sort and scatter are separate
launches of a few microseconds each, per MoE layer, which decode steps feel."""


def group_by_expert(ids: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token copies ``ids`` [M] (expert ids; ``n_experts`` and above route nowhere) grouped by
    expert: ``order`` [M], the stable sort of the copies by id; ``position`` [M], where each
    copy lands in it (``order``'s inverse); ``counts`` [E], copies per expert.

    Up to :data:`COMPARED_COPIES` copies a copy's position is the number of copies before it
    (a smaller id, or an equal one earlier): the same stable order as a sort.
    """
    M = ids.shape[0]
    i = jnp.arange(M, dtype=jnp.int32)
    if M <= COMPARED_COPIES:
        a, b = ids[:, None], ids[None, :]
        position = jnp.sum((b < a) | ((b == a) & (i[None, :] < i[:, None])), axis=1, dtype=jnp.int32)
        order = jnp.sum(jnp.where(position[None, :] == i[:, None], i[None, :], 0), axis=1, dtype=jnp.int32)
        counts = jnp.sum(ids[None, :] == jnp.arange(n_experts, dtype=ids.dtype)[:, None], axis=1, dtype=jnp.int32)
        return order, position, counts
    order = jnp.argsort(ids, stable=True).astype(jnp.int32)
    position = jnp.zeros_like(order).at[order].set(i)
    counts = jnp.bincount(ids, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    return order, position, counts


def route_tokens(
    x: jax.Array, idx: jax.Array, weights: jax.Array, me: jax.Array | int, devices: int, n_experts: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Device ``me``'s share of the tokens ``x`` [T, D] (``idx`` [T, K]; ids ``n_experts``
    route nowhere): its copies' rows sorted by expert [Ts*K, D], that order [Ts*K] (into
    the share's copies, token-major), the copies per expert [E] and the share's router
    weights [Ts, K]."""
    T, K = idx.shape
    Ts = -(-T // devices)
    pad = ((0, Ts * devices - T), (0, 0))
    xs = jax.lax.dynamic_slice_in_dim(jnp.pad(x, pad), me * Ts, Ts)
    ids = jax.lax.dynamic_slice_in_dim(jnp.pad(idx, pad, constant_values=n_experts), me * Ts, Ts).reshape(-1)
    ws = jax.lax.dynamic_slice_in_dim(jnp.pad(weights, pad), me * Ts, Ts)
    order, _, counts = group_by_expert(ids, n_experts)  # copies routed nowhere sort last and are never sent
    return xs[order // K], order, counts, ws


class ExchangePlan(NamedTuple):
    """One device's part in an exchange, derived from every device's copies per expert.

    ``send`` and ``back`` are the ``(input_offsets, send_sizes, output_offsets,
    recv_sizes)`` [P] of ``ragged_all_to_all`` that send the sorted copies to the receive
    buffers and the results back into the same slots. ``position`` [R]: the row of each
    receive-buffer row among the rows sorted by local expert. ``expert`` [R]: the local
    expert of each sorted row, ``E / P`` (no expert) past the rows received. ``dropped``:
    copies beyond the receive buffers of the expert axis (the same on each of its devices).
    """

    send: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    back: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    position: jax.Array
    expert: jax.Array
    dropped: jax.Array


def exchange_plan(counts: jax.Array, me: jax.Array | int, rows: int) -> ExchangePlan:
    """The plan of device ``me`` from ``counts`` [P, E] (device i's copies for each expert;
    expert g lives on device g // (E / P)) with receive buffers of ``rows``."""
    P, E = counts.shape
    e_local = E // P
    per = counts.astype(jnp.int32).reshape(P, P, e_local)  # [sender, receiver, receiver's local expert]
    pair = per.sum(-1)  # [sender, receiver]
    src = jnp.cumsum(pair, axis=1) - pair  # where a sender's rows for a receiver start among its sorted copies
    dst = jnp.cumsum(pair, axis=0) - pair  # where they start in the receiver's buffer
    sent = jnp.clip(rows - dst, 0, pair)  # what fits
    dst = jnp.minimum(dst, rows)  # a slice that does not fit starts at the buffer's end, empty
    send = (src[me], sent[me], dst[me], sent[:, me])
    back = (dst[:, me], sent[:, me], src[:, me], sent[me])
    # the receive buffer: segments (sender, local expert) in that order, from row 0
    mine = per[:, me]
    within = jnp.cumsum(mine, axis=1) - mine  # a segment's start within its sender's rows
    kept = jnp.clip(sent[:, me, None] - within, 0, mine)
    start = (dst[:, me, None] + within).reshape(-1)
    sizes = kept.sum(0)  # rows per local expert
    sorted_start = ((jnp.cumsum(sizes) - sizes)[None] + jnp.cumsum(kept, axis=0) - kept).reshape(-1)
    r = jnp.arange(rows, dtype=jnp.int32)
    segment = jnp.minimum(jnp.searchsorted(start + kept.reshape(-1), r, side="right"), P * e_local - 1)
    position = jnp.where(r < sizes.sum(), sorted_start[segment] + r - start[segment], r)
    expert = jnp.searchsorted(jnp.cumsum(sizes), r, side="right")
    return ExchangePlan(send, back, position, expert, pair.sum() - sent.sum())


def run_local_experts(local_experts: LocalExperts, state, received: jax.Array, plan: ExchangePlan) -> jax.Array:
    """The local experts' outputs for the receive buffer ``received`` [R, D], in its order."""
    rows = jnp.zeros_like(received).at[plan.position].set(received)
    return local_experts(state, rows, plan.expert)[plan.position]


def combine(back: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """The results ``back`` [Ts*K, D] of the copies in ``order`` weighted by the router
    ``weights`` [Ts, K] and summed per token, in float32: -> [Ts, D]."""
    Ts, K = weights.shape
    per_copy = jnp.zeros_like(back).at[order].set(back)
    return jnp.einsum("tkd,tk->td", per_copy.reshape(Ts, K, -1).astype(jnp.float32), weights)


def bucket_exchange(
    operand: jax.Array, output: jax.Array, input_offsets: jax.Array, send_sizes: jax.Array,
    output_offsets: jax.Array, recv_sizes: jax.Array, *, axis_name, bucket: int,
) -> jax.Array:
    """``jax.lax.ragged_all_to_all``'s result through ``all_to_all`` of P buckets of
    ``bucket`` rows (no send size may exceed it); ``axis_name`` None: one device, no
    collective."""
    slot = jnp.arange(bucket)
    buckets = operand.at[input_offsets[:, None] + slot].get(mode="fill", fill_value=0)  # [P, C, D]
    offsets = output_offsets
    if axis_name is not None:
        buckets = jax.lax.all_to_all(buckets, axis_name, 0, 0, tiled=True)
        offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    target = jnp.where(slot < recv_sizes[:, None], offsets[:, None] + slot, output.shape[0])  # past the end: dropped
    return output.at[target].set(buckets, mode="drop")


def expert_parallel_moe(
    x: jax.Array,
    idx: jax.Array,
    weights: jax.Array,
    expert_state,
    expert_specs,
    local_experts: LocalExperts,
    *,
    mesh: Mesh,
    n_experts: int,
    expert_axes: tuple[str, ...],
    token_axes: tuple[str, ...],
    hidden_axes: tuple[str, ...],
    exchange: str = "auto",
    capacity: float | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Routed-expert outputs combined with the router ``weights``: [T, D] -> [T, D].

    ``x`` [T, D], ``idx`` / ``weights`` [T, K] are split over ``token_axes`` (data
    parallelism) and replicated elsewhere; ``expert_state`` is split by ``expert_specs``
    (its leading axis over ``expert_axes``; expert hidden dims over ``hidden_axes``).
    ``exchange`` is one of :data:`EXCHANGES` (``auto`` decides by the platform of the mesh's
    devices). With a ``capacity`` (see the module docstring) returns ``(output, dropped)``,
    ``dropped`` the int32 count of token copies dropped over the whole mesh.
    """
    shared = sorted(set(expert_axes) & set(token_axes))
    if shared:
        raise ValueError(
            f"expert parallelism needs the experts' mesh axes {list(expert_axes)} to be distinct from the "
            f"batch's {list(token_axes)}; both use {shared} (map 'expert' and 'batch' to different mesh axes)"
        )
    P = 1
    for a in expert_axes:
        P *= mesh.shape[a]
    if n_experts % P:
        raise ValueError(f"{n_experts} experts cannot be split over {P} devices of mesh axes {list(expert_axes)}")
    abstract = isinstance(mesh, jax.sharding.AbstractMesh)  # tracing for export: the platform comes later
    exchange = choose_exchange(exchange, None if abstract else mesh.devices.flat[0].platform)
    tok = PartitionSpec(_axes(token_axes))
    ep = _axes(expert_axes)

    def body(x, idx, weights, state):
        T, D = x.shape
        rows, bucket = buffer_rows(T, idx.shape[1], n_experts, P, capacity)
        if ep is None or exchange == "bucket":
            move = functools.partial(bucket_exchange, axis_name=ep, bucket=bucket)
        else:
            move = functools.partial(jax.lax.ragged_all_to_all, axis_name=ep)
        me = jax.lax.axis_index(ep) if ep is not None else 0
        sent, order, counts, ws = route_tokens(x, idx, weights, me, P, n_experts)
        plan = exchange_plan(jax.lax.all_gather(counts, ep) if ep is not None else counts[None], me, rows)
        received = move(sent, jnp.zeros((rows, D), sent.dtype), *plan.send)
        out = run_local_experts(local_experts, state, received, plan)
        if hidden_axes:
            out = jax.lax.psum(out, _axes(hidden_axes))
        back = move(out, jnp.zeros((sent.shape[0], D), out.dtype), *plan.back)
        mine = combine(back, order, ws).astype(x.dtype)
        if ep is not None:
            mine = jax.lax.all_gather(mine, ep, tiled=True)
        dropped = jax.lax.psum(plan.dropped, _axes(token_axes)) if token_axes else plan.dropped
        return mine[:T], dropped

    T = x.shape[0]
    shards = 1
    for a in token_axes:
        shards *= mesh.shape[a]
    pad = ((0, -T % shards), (0, 0))  # padding tokens route nowhere and are dropped at the end
    x, idx, weights = jnp.pad(x, pad), jnp.pad(idx, pad, constant_values=n_experts), jnp.pad(weights, pad)
    out, dropped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tok, tok, tok, expert_specs),
        out_specs=(tok, PartitionSpec()),
        check_vma=False,
    )(x, idx, weights, expert_state)
    return out[:T] if capacity is None else (out[:T], dropped)
