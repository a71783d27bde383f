"""The expert-parallel MoE against the single-device one and a numpy reference on 8 CPU
devices (the bucket exchange), and the ragged exchange's pieces in a numpy simulation of
``jax.lax.ragged_all_to_all`` (which XLA:CPU does not implement)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as Spec

from kimi_jax.config.model import KimiConfig
from kimi_jax.model.moe import MoE
from kimi_jax.parallel import Parallel, expert, load_layout
from kimi_jax.parallel.expert import (
    bucket_exchange,
    buffer_rows,
    choose_exchange,
    combine,
    exchange_plan,
    expert_parallel_moe,
    group_by_expert,
    route_tokens,
    run_local_experts,
)
from kimi_jax.testing.synthetic import k25_config

pytestmark = pytest.mark.mesh

MESHES = ["data=1,expert=8,tensor=1", "data=1,expert=4,tensor=2", "data=2,expert=2,tensor=2",
          "data=1,expert=1,tensor=8", "data=8,expert=1,tensor=1"]


def moe_config():
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=80, moe_intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=8, q_lora_rank=16, kv_lora_rank=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=16,
                num_experts_per_tok=3, n_group=4, topk_group=2)
    return KimiConfig.from_dict(k25_config(text, multimodal=False)).text


def shard(cfg, expert_format, seed, parallel):
    """The MoE built with ``seed`` on ``parallel``, its weights placed in the layout's shardings."""
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed), expert_format=expert_format, parallel=parallel)
    graphdef, state = nnx.split(moe)
    shardings = parallel.state_shardings(state)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, state.to_pure_dict(), shardings))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("expert_format", ["dense", "int4"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_expert_parallel_equals_single_device(mesh_spec, expert_format):
    cfg = moe_config()
    moe = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), expert_format=expert_format)
    x = jax.random.normal(jax.random.key(0), (3, 7, cfg.hidden_size))  # 21 tokens: padding on every mesh
    ref = np.asarray(moe(x))
    parallel = Parallel.create(mesh_spec)
    sharded = shard(cfg, expert_format, 3, parallel)
    expert_axis = parallel.layout.axis_size("expert")
    shard_shape = sharded.experts.gate_proj.addressable_shards[0].data.shape if expert_format == "dense" else \
        sharded.experts.gate_proj.q.addressable_shards[0].data.shape
    assert shard_shape[0] == cfg.n_routed_experts // expert_axis
    out = np.asarray(nnx.jit(lambda m, x: m(x))(sharded, x))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_experts_not_divisible_by_mesh():
    """12 experts cannot be split over an expert axis of 8: a clear error, not a silent reshard."""
    text = dict(moe_config().__dict__)
    cfg = moe_config().__class__(**{**text, "n_routed_experts": 12, "n_group": 1, "topk_group": 1})
    moe = nnx.eval_shape(lambda: MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    mesh = jax.sharding.AbstractMesh((1, 8, 1), ("data", "expert", "tensor"))
    with pytest.raises(ValueError, match="axis 'expert' of size 12 cannot be split 8 ways"):
        Parallel(mesh, load_layout("data=1,expert=8,tensor=1")).state_shardings(nnx.state(moe))


def test_expert_axes_must_differ_from_batch_axes(tmp_path):
    """Experts split over the batch's mesh axis too would mix data shards: refused, not wrong."""
    f = tmp_path / "overlap.toml"
    f.write_text('[mesh]\ndata = 2\nexpert = 4\ntensor = 1\n[rules]\nbatch = "data"\nexpert = ["expert", "data"]\n')
    cfg = moe_config()
    moe = shard(cfg, "dense", 0, Parallel.create(f))
    x = jnp.ones((4, 3, cfg.hidden_size))
    with pytest.raises(ValueError, match="distinct from the batch's"):
        nnx.jit(lambda m, x: m(x))(moe, x)


# A toy MoE for the exchange itself: experts relu(x @ w1[e]) @ w2[e], skewed routing.
N_EXPERTS, TOP_K, D, F = 16, 3, 6, 8


def toy(seed: int, tokens: int = 21):
    rng = np.random.default_rng(seed)
    popular = 1.0 / (1 + np.arange(N_EXPERTS))  # unbalanced: the low experts' devices overflow first
    idx = np.stack([rng.choice(N_EXPERTS, TOP_K, replace=False, p=popular / popular.sum()) for _ in range(tokens)])
    experts = {"w1": rng.normal(size=(N_EXPERTS, D, F)).astype(np.float32),
               "w2": rng.normal(size=(N_EXPERTS, F, D)).astype(np.float32)}
    return (rng.normal(size=(tokens, D)).astype(np.float32), idx.astype(np.int32),
            rng.uniform(0.1, 1, size=(tokens, TOP_K)).astype(np.float32), experts)


def local_experts(w, rows, ids):
    """:data:`LocalExperts` of the toy (a slice of the experts' hidden dimension gives a partial sum)."""
    e_local = w["w1"].shape[0]
    e = jnp.minimum(ids, e_local - 1)
    h = jax.nn.relu(jnp.einsum("md,mdf->mf", rows, w["w1"][e]))
    return jnp.where((ids < e_local)[:, None], jnp.einsum("mf,mfd->md", h, w["w2"][e]), 0)


def reference(x, idx, weights, experts, keep):
    """Every kept copy (token, k) through its expert in numpy, weighted and summed per token."""
    out = np.zeros(x.shape, np.float64)
    for t, k in zip(*np.nonzero(keep)):
        e = idx[t, k]
        out[t] += weights[t, k] * (np.maximum(x[t] @ experts["w1"][e], 0) @ experts["w2"][e])
    return out


def kept_copies(idx, devices: int, rows: int):
    """Which copies of one data shard's tokens (``idx`` [T, K], id N_EXPERTS: none) fit the
    receive buffers: each receiver takes its senders in order, a sender's copies by expert
    then token, until ``rows``."""
    T, K = idx.shape
    share, e_local = -(-T // devices), N_EXPERTS // devices
    keep = np.zeros((T, K), bool)
    for receiver in range(devices):
        taken = 0
        for sender in range(devices):
            copies = [(idx[t, k], t, k) for t in range(sender * share, min((sender + 1) * share, T)) for k in range(K)
                      if idx[t, k] < N_EXPERTS and idx[t, k] // e_local == receiver]
            for _, t, k in sorted(copies):
                keep[t, k] = taken < rows
                taken += 1
    return keep


def ragged_all_to_all_np(operands, outputs, args):
    """``jax.lax.ragged_all_to_all`` over len(operands) devices, as its docstring specifies;
    ``args[i]`` = device i's (input_offsets, send_sizes, output_offsets, recv_sizes). Checks
    the sizes agree, every slice is in bounds and no output row is written twice."""
    results = [np.array(o) for o in outputs]
    written = [np.zeros(len(o), bool) for o in outputs]
    for i, (in_off, send, out_off, _) in enumerate(args):
        for j in range(len(operands)):
            n, a, b = int(send[j]), int(in_off[j]), int(out_off[j])
            assert n == args[j][3][i] and 0 <= a and a + n <= len(operands[i]) and 0 <= b and b + n <= len(results[j])
            assert not written[j][b:b + n].any()
            written[j][b:b + n] = True
            results[j][b:b + n] = operands[i][a:a + n]
    return results


@pytest.mark.parametrize("capacity", [None, 1.0, 0.4])
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_ragged_pieces_in_simulated_exchange(devices, capacity):
    """Routing, the plan from the gathered counts, the local experts on the receive buffer and
    the combine, with both ``ragged_all_to_all`` calls simulated: the reference MoE output
    (copies past a capacity dropped as specified, and counted)."""
    x, idx, weights, experts = toy(devices)
    T, e_local = x.shape[0], N_EXPERTS // devices
    rows, _ = buffer_rows(T, TOP_K, N_EXPERTS, devices, capacity)
    shares = [route_tokens(x, idx, weights, p, devices, N_EXPERTS) for p in range(devices)]
    plans = [exchange_plan(np.stack([s[2] for s in shares]), p, rows) for p in range(devices)]
    received = ragged_all_to_all_np([s[0] for s in shares], [np.zeros((rows, D), np.float32)] * devices,
                                    [plan.send for plan in plans])
    outs = []
    for p, plan in enumerate(plans):
        ids = np.asarray(plan.expert)
        assert (np.diff(ids) >= 0).all() and ids.max() <= e_local  # sorted; past the rows received: no expert
        local = {k: v[p * e_local:(p + 1) * e_local] for k, v in experts.items()}
        outs.append(np.asarray(run_local_experts(local_experts, local, received[p], plan)))
    back = ragged_all_to_all_np(outs, [np.zeros_like(s[0]) for s in shares],
                                [plan.back for plan in plans])
    out = np.concatenate([combine(back[p], shares[p][1], shares[p][3]) for p in range(devices)])[:T]
    keep = kept_copies(idx, devices, rows)
    assert keep.all() if capacity is None else capacity == 1.0 or not keep.all()  # 0.4 drops on every mesh
    np.testing.assert_allclose(out, reference(x, idx, weights, experts, keep), rtol=1e-5, atol=1e-5)
    assert [int(plan.dropped) for plan in plans] == [int((~keep).sum())] * devices


def test_bucket_exchange_is_ragged_all_to_all():
    """The bucket exchange on 8 devices writes what ``ragged_all_to_all`` would, with slices
    at offsets of any order (here senders land in a shuffled order) and gaps."""
    P, n_in, n_out = 8, 32, 40
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 4, size=(P, P))  # [sender, receiver]
    in_off = np.cumsum(sizes, axis=1) - sizes + rng.integers(0, 2, size=(P, 1))
    out_off = np.zeros((P, P), np.int64)
    for j in range(P):
        order = rng.permutation(P)
        out_off[order, j] = np.cumsum(sizes[order, j]) - sizes[order, j] + j % 3
    args = [(in_off[i], sizes[i], out_off[i], sizes[:, i]) for i in range(P)]
    operands = rng.normal(size=(P, n_in, D)).astype(np.float32)
    outputs = rng.normal(size=(P, n_out, D)).astype(np.float32)
    expected = ragged_all_to_all_np(list(operands), list(outputs), args)
    mesh = jax.make_mesh((P,), ("x",), axis_types=(AxisType.Auto,))
    exchange = jax.jit(jax.shard_map(functools.partial(bucket_exchange, axis_name="x", bucket=int(sizes.max())),
                                     mesh=mesh, in_specs=Spec("x"), out_specs=Spec("x")))
    ints = [np.stack([a[n] for a in args]).reshape(-1).astype(np.int32) for n in range(4)]
    got = exchange(operands.reshape(P * n_in, D), outputs.reshape(P * n_out, D), *ints)
    np.testing.assert_array_equal(np.asarray(got), np.concatenate(expected))


MESH_AXES = ("data", "expert", "tensor")


@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("shape,expert_axes", [((1, 8, 1), ("expert",)), ((2, 4, 1), ("expert",)),
                                               ((2, 2, 2), ("expert",)), ((1, 1, 8), ("expert",)),
                                               ((8, 1, 1), ())])
def test_bucket_path_equals_reference(shape, expert_axes, capacity):
    """``exchange="bucket"`` against the numpy MoE, experts' hidden dimension over 'tensor';
    with a capacity the dropped copies are those specified, and their count comes back."""
    x, idx, weights, experts = toy(1)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    specs = {"w1": Spec("expert", None, "tensor"), "w2": Spec("expert", "tensor", None)}
    state = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in experts.items()}
    moe = jax.jit(functools.partial(
        expert_parallel_moe, expert_specs=specs, local_experts=local_experts, mesh=mesh, n_experts=N_EXPERTS,
        expert_axes=expert_axes, token_axes=("data",), hidden_axes=("tensor",), exchange="bucket", capacity=capacity,
    ))
    result = moe(x, idx, weights, state)
    out, dropped = result if capacity is not None else (result, None)
    shards, devices = shape[0], shape[1] if expert_axes else 1
    per_shard = -(-x.shape[0] // shards)
    rows, _ = buffer_rows(per_shard, TOP_K, N_EXPERTS, devices, capacity)
    padded = np.pad(idx, ((0, per_shard * shards - x.shape[0]), (0, 0)), constant_values=N_EXPERTS)
    keep = np.concatenate([kept_copies(padded[s * per_shard:(s + 1) * per_shard], devices, rows)
                           for s in range(shards)])[:x.shape[0]]
    np.testing.assert_allclose(np.asarray(out), reference(x, idx, weights, experts, keep), rtol=1e-5, atol=1e-5)
    if capacity is not None:
        assert int(dropped) == (~keep).sum() > 0


def test_ragged_exchange_refused_on_cpu():
    """XLA:CPU has no ragged_all_to_all: asking for it there is a clear error; auto takes buckets."""
    assert choose_exchange("auto", "cpu") == "bucket"
    assert choose_exchange("auto", "gpu") == "bucket"  # ragged measured slower on one GPU: opt-in
    assert choose_exchange("ragged", "gpu") == choose_exchange("ragged", "tpu") == "ragged"
    with pytest.raises(ValueError, match="unknown expert-parallel exchange"):
        choose_exchange("dense", "cpu")
    x, idx, weights, experts = toy(0)
    mesh = jax.make_mesh((1, 8, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    with pytest.raises(ValueError, match="ragged_all_to_all, which XLA does not implement for platform 'cpu'"):
        expert_parallel_moe(x, idx, weights, experts, {"w1": Spec("expert"), "w2": Spec("expert")}, local_experts,
                            mesh=mesh, n_experts=N_EXPERTS, expert_axes=("expert",), token_axes=("data",),
                            hidden_axes=(), exchange="ragged")


def test_ragged_path_lowers_for_gpu(monkeypatch):
    """The ragged path, exported for CUDA from this CPU host (the platform check lifted only
    for that): the two exchanges are ``ragged_all_to_all`` calls of the planned buffers."""
    monkeypatch.setattr(expert, "RAGGED_PLATFORMS", (*expert.RAGGED_PLATFORMS, "cpu"))
    x, idx, weights, experts = toy(0)
    mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    specs = {"w1": Spec("expert", None, "tensor"), "w2": Spec("expert", "tensor", None)}
    moe = jax.jit(functools.partial(
        expert_parallel_moe, expert_specs=specs, local_experts=local_experts, mesh=mesh, n_experts=N_EXPERTS,
        expert_axes=("expert",), token_axes=("data",), hidden_axes=("tensor",), exchange="ragged", capacity=0.5,
    ))
    exported = jax.export.export(
        moe, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    )(x, idx, weights, experts)
    calls = [line for line in exported.mlir_module().splitlines() if "custom_call @ragged_all_to_all" in line]
    rows, _ = buffer_rows(11, TOP_K, N_EXPERTS, 2, 0.5)  # 21 tokens: 11 per data shard, 6 per device
    assert len(calls) == 2
    assert f"(tensor<18x{D}xf32>, tensor<{rows}x{D}xf32>," in calls[0]  # the sorted copies into the receive buffer
    assert f"(tensor<{rows}x{D}xf32>, tensor<18x{D}xf32>," in calls[1]  # and back


def test_buffer_rows():
    """K2.5 sizes: no drops at T * min(K, E/P) rows; a capacity is a factor of the mean T * K / P."""
    assert buffer_rows(4096, 8, 384, 8, None) == (32768, 4096)
    assert buffer_rows(4096, 8, 384, 64, None) == (4096 * 6, 64 * 6)  # 6 experts per device: at most 6 copies a token
    assert buffer_rows(4096, 8, 384, 8, 2.0) == (8192, 4096)
    assert buffer_rows(4096, 8, 384, 8, 0.25) == (1024, 1024)
    assert buffer_rows(1, 8, 384, 8, 1.0) == (1, 1)
    with pytest.raises(ValueError, match="capacity must be positive"):
        buffer_rows(64, 8, 384, 8, 0.0)


@pytest.mark.parametrize("copies", [1, 8, 64, 3 * expert.COMPARED_COPIES // 2])
def test_group_by_expert_is_a_stable_sort(copies):
    """Both ways (pairwise ranks up to COMPARED_COPIES, a sort past it) give numpy's stable
    argsort, its inverse and the counts, with ids past the experts routed nowhere (sorted last)."""
    n_experts = 12
    ids = np.random.default_rng(copies).integers(0, n_experts + 1, copies).astype(np.int32)  # n_experts: nowhere
    order, position, counts = jax.jit(group_by_expert, static_argnums=1)(jnp.asarray(ids), n_experts)
    want = np.argsort(ids, kind="stable")
    np.testing.assert_array_equal(order, want)
    np.testing.assert_array_equal(np.asarray(position)[want], np.arange(copies))
    np.testing.assert_array_equal(counts, np.bincount(ids, minlength=n_experts + 1)[:n_experts])
