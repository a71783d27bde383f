"""Expert parallelism: routed experts split over a mesh axis, tokens sent to their experts.

Einsum letters: T tokens, K chosen experts per token, D model, P devices on the expert axis,
C bucket capacity (rows one device sends another).

Inside ``jax.shard_map`` each device holds ``E / P`` experts (and, with tensor parallelism,
a slice of each expert's hidden dimension). A device's tokens are split evenly over the
devices of its expert axis; each device then

1. sorts its token copies (token, chosen expert) by owning device into P buckets of
   capacity C = (its tokens) x K, so nothing is ever dropped;
2. exchanges buckets with ``all_to_all`` over the expert axis;
3. runs the received rows through its local experts (grouped matmuls on rows sorted by
   local expert), summing partial results over the tensor axis when expert hidden
   dimensions are split;
4. sends results back with a second ``all_to_all``, combines each token's K results with
   its router weights (float32), and all-gathers the tokens over the expert axis.

``all_to_all`` with fixed buckets runs on every backend (``ragged_all_to_all`` is not
implemented on XLA:CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

LocalExperts = Callable[[object, jax.Array, jax.Array], jax.Array]
"""``(local expert state, rows [M, D], local expert id [M]) -> [M, D]``: the local experts'
outputs for rows sorted by local expert id; rows whose id is the number of local experts
belong to no expert (their outputs are discarded)."""


def _axes(names: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not names else names[0] if len(names) == 1 else names


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
) -> jax.Array:
    """Routed-expert outputs combined with the router ``weights``: [T, D] -> [T, D].

    ``x`` [T, D], ``idx`` / ``weights`` [T, K] are split over ``token_axes`` (data
    parallelism) and replicated elsewhere; ``expert_state`` is split by ``expert_specs``
    (its leading axis over ``expert_axes``; expert hidden dims over ``hidden_axes``).
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
    e_local = n_experts // P
    tok = PartitionSpec(_axes(token_axes))
    ep = _axes(expert_axes)

    def body(x, idx, weights, state):
        T, D = x.shape
        K = idx.shape[1]
        # 1. this device's share of the tokens
        Ts = -(-T // P)
        pad = Ts * P - T
        x_p = jnp.pad(x, ((0, pad), (0, 0)))
        idx_p = jnp.pad(idx, ((0, pad), (0, 0)))
        w_p = jnp.pad(weights, ((0, pad), (0, 0)))
        me = jax.lax.axis_index(ep) if ep is not None else 0
        xs = jax.lax.dynamic_slice_in_dim(x_p, me * Ts, Ts)
        ids = jax.lax.dynamic_slice_in_dim(idx_p, me * Ts, Ts).reshape(-1)  # [Ts*K]
        ws = jax.lax.dynamic_slice_in_dim(w_p, me * Ts, Ts)
        real = (me * Ts + jnp.arange(Ts) < T).repeat(K)  # padding tokens send nothing
        # 2. buckets by destination device, capacity C = Ts*K (no drops)
        C = Ts * K
        key = jnp.where(real, ids, n_experts)  # padding copies sort last, to "device" P
        order = jnp.argsort(key, stable=True)  # by device, then expert
        dest_sorted = key[order] // e_local
        start = jnp.searchsorted(dest_sorted, jnp.arange(P))
        slot = jnp.arange(Ts * K) - start[jnp.minimum(dest_sorted, P - 1)]
        send_rows = jnp.zeros((P, C, D), x.dtype)
        send_ids = jnp.full((P, C), -1, jnp.int32)
        keep = dest_sorted < P
        d_idx, s_idx = dest_sorted, jnp.where(keep, slot, 0)  # padding copies: out of bounds, dropped
        send_rows = send_rows.at[d_idx, s_idx].set(xs[order // K], mode="drop")
        send_ids = send_ids.at[d_idx, s_idx].set(ids[order] % e_local, mode="drop")
        # 3. exchange and compute on the local experts
        if ep is not None:
            recv_rows = jax.lax.all_to_all(send_rows, ep, 0, 0, tiled=True)
            recv_ids = jax.lax.all_to_all(send_ids, ep, 0, 0, tiled=True)
        else:
            recv_rows, recv_ids = send_rows, send_ids
        flat_rows, flat_ids = recv_rows.reshape(P * C, D), recv_ids.reshape(-1)
        valid = flat_ids >= 0
        local_order = jnp.argsort(jnp.where(valid, flat_ids, e_local), stable=True)
        out_sorted = local_experts(state, flat_rows[local_order], jnp.where(valid, flat_ids, e_local)[local_order])
        out = jnp.zeros_like(out_sorted).at[local_order].set(out_sorted)
        out = jnp.where(valid[:, None], out, 0)
        if hidden_axes:
            out = jax.lax.psum(out, _axes(hidden_axes))
        # 4. back to the senders, combine, gather the tokens of the expert axis
        back = out.reshape(P, C, D)
        if ep is not None:
            back = jax.lax.all_to_all(back, ep, 0, 0, tiled=True)
        copies = back.at[d_idx, s_idx].get(mode="fill", fill_value=0)  # in `order`
        per_copy = jnp.zeros((Ts * K, D), copies.dtype).at[order].set(jnp.where(keep[:, None], copies, 0))
        mine = jnp.einsum("tkd,tk->td", per_copy.reshape(Ts, K, D).astype(jnp.float32), ws).astype(x.dtype)
        if ep is not None:
            mine = jax.lax.all_gather(mine, ep, tiled=True)
        return mine[:T]

    T = x.shape[0]
    shards = 1
    for a in token_axes:
        shards *= mesh.shape[a]
    pad = -T % shards  # padding tokens have zero router weights; their rows are dropped at the end
    if pad:
        x, idx, weights = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, idx, weights))
    out = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tok, tok, tok, expert_specs),
        out_specs=tok,
        check_vma=False,
    )(x, idx, weights, expert_state)
    return out[:T]
