"""What a deployment of a model on some hardware holds and how fast it can run.

Bytes per device come from :func:`kimi_jax.checkpoint.summary.sharded_bytes` (what ``kimi-jax
info --mesh`` prints); the KV cache per token from the cache the engine allocates. Times are
rooflines: each step takes the longer of reading its bytes at the HBM bandwidth and doing its
FLOPs at the bf16 matmul rate, plus its collectives at the link bandwidth (one direction: half
the catalog's figure; in-host links for collectives whose devices share a host, else the
cross-host bandwidth); latencies and overlap are not modelled. Where the engine benchmark has
measured this kind of device, its decode efficiency turns the decode roofline into a
prediction (``basis``: ``"measured"``).

Decode steps are timed with every sequence holding ``context`` cached tokens (the worst step
at that length); prefill reads one sequence of ``context`` tokens in chunks of
``prefill_chunk`` (each chunk reads the weights it touches again), one sequence per data group.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from kimi_jax.checkpoint.summary import (
    VISION,
    active_parameters,
    model_weights,
    parameter_counts,
    sharded_bytes,
)
from kimi_jax.config.model import KimiConfig
from kimi_jax.parallel.layout import Layout, LayoutError, load_layout
from kimi_jax.plan import measured
from kimi_jax.plan.hardware import Hardware

PARTS = {
    "experts": ("routed_experts",),
    "attention": ("attention",),
    "dense": ("dense_mlp", "shared_experts", "router", "norms"),
    "embeddings": ("embedding", "lm_head"),
    "vision": (VISION,),
}
"""The parts the planner reports, as sums of :data:`kimi_jax.checkpoint.summary.COMPONENTS`."""
EXPERT_FORMATS = {"int4": "int4", "bf16": "dense"}
"""``--experts`` choices -> the model's ``expert_format``."""
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
"""Parameter and KV cache dtypes by name."""
DEFAULT_RESERVE = 0.1
"""Share of each device's memory kept free for activations, temporaries and the runtime."""
ACTIVATION_BYTES = 2  # bf16 activations on the links


@dataclasses.dataclass(frozen=True)
class Request:
    """What is asked: the hardware, how many devices on how many hosts, the workload, and the
    model's format (routed experts ``int4`` or ``bf16``; the other parameters in ``dtype``)."""

    hardware: Hardware
    devices: int
    hosts: int | None = None
    context: int | None = None
    concurrency: int = 1
    experts: str = "int4"
    dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    reserve: float = DEFAULT_RESERVE
    prefill_chunk: int = 512


@dataclasses.dataclass(frozen=True)
class Plan:
    """The answer for one layout. Bytes are per device; token counts and rates are for the whole mesh."""

    request: Request
    hosts: int
    context: int
    layout: Layout
    weights_by_component: dict[str, int]
    kv_bytes_per_token: int
    reserve_bytes: int
    max_cached_tokens: int
    max_concurrent_sequences: int
    decode_roofline_s: tuple[float, float]
    decode_efficiency: tuple[float, float] | None
    prefill_s: float

    @property
    def weights_bytes_per_device(self) -> int:
        return sum(self.weights_by_component.values())

    @property
    def weights_by_part(self) -> dict[str, int]:
        return {part: sum(self.weights_by_component[c] for c in comps) for part, comps in PARTS.items()}

    @property
    def fits(self) -> bool:
        """The weights and the reserve fit on every device with room for one sequence of the context."""
        return self.max_concurrent_sequences >= 1

    @property
    def basis(self) -> str:
        return "roofline" if self.decode_efficiency is None else "measured"

    @property
    def decode_s(self) -> tuple[float, float]:
        """Seconds per decode step at batch 1 and at the concurrency (predicted when measured)."""
        if self.decode_efficiency is None:
            return self.decode_roofline_s
        return tuple(t / e for t, e in zip(self.decode_roofline_s, self.decode_efficiency))

    def to_json(self) -> dict:
        r = self.request
        rules = {logical: list(axes) for logical, axes in self.layout.rules if not logical.endswith("_groups")}
        return {
            "fits": self.fits,
            "hardware": r.hardware.key,
            "devices": r.devices,
            "hosts": self.hosts,
            "context": self.context,
            "concurrency": r.concurrency,
            "experts": r.experts,
            "dtype": r.dtype,
            "kv_dtype": r.kv_dtype,
            "layout": {"name": self.layout.name, "mesh": self.layout.shape, "rules": rules},
            "memory_bytes_per_device": int(r.hardware.memory_bytes),
            "reserve_bytes_per_device": self.reserve_bytes,
            "weights_bytes_per_device": self.weights_bytes_per_device,
            "weights_bytes_by_part": self.weights_by_part,
            "weights_bytes_by_component": self.weights_by_component,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_cached_tokens": self.max_cached_tokens,
            "max_concurrent_sequences": self.max_concurrent_sequences,
            "concurrency_fits": self.max_concurrent_sequences >= r.concurrency,
            "decode_ms_per_token": 1e3 * self.decode_s[0],
            "decode_tokens_per_s": r.concurrency / self.decode_s[1],
            "decode_roofline_ms_per_token": 1e3 * self.decode_roofline_s[0],
            "decode_efficiency": None if self.decode_efficiency is None else list(self.decode_efficiency),
            "prefill_tokens_per_s": self.layout.axis_size("data") * self.context / self.prefill_s,
            "basis": self.basis,
            "prefill_basis": "roofline",
        }


def kv_bytes_per_token(config: KimiConfig, kv_dtype: str = "bfloat16") -> int:
    """Bytes the engine's KV cache holds per cached token, all layers (K2.5 in bf16: 61 x 576 x 2)."""
    from kimi_jax.model.cache import KVCache

    if kv_dtype not in DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; choose from {list(DTYPES)}")
    one = jax.eval_shape(lambda: KVCache.create(config.text, 1, 1, DTYPES[kv_dtype]))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(one.runs))


def candidate_layouts(devices: int) -> list[Layout]:
    """Meshes of ``devices`` devices worth trying: every (data, expert, tensor) split with the
    default rules, and, for a tensor axis of 1, the ``gpu-8`` kind (heads, dense MLP and
    vocabulary split over the expert axis too)."""
    found = []
    for d in _divisors(devices):
        for e in _divisors(devices // d):
            t = devices // (d * e)
            base = load_layout(f"data={d},expert={e},tensor={t}")
            found.append(base)
            if t == 1 and e > 1:
                over = {"heads": ("expert",), "mlp": ("expert",), "vocab": ("expert",), "expert_mlp": ()}
                rules = tuple((k, over.get(k.removesuffix("_groups"), v)) for k, v in base.rules)
                found.append(dataclasses.replace(base, name=f"{base.name}+shared", rules=rules))
    return found


def plan(config: KimiConfig, request: Request, layout: str | Layout | None = None,
         results: Path = measured.RESULTS) -> Plan:
    """The plan for ``request``: under ``layout`` if given, else under the best candidate (the
    most concurrent sequences up to the concurrency asked for, then the fastest decode at it,
    then the fewest bytes per device; if nothing fits, the fewest bytes per device)."""
    hw, t = request.hardware, config.text
    if request.devices < 1:
        raise ValueError(f"a plan needs at least one device, got {request.devices}")
    hosts = request.hosts if request.hosts is not None else -(-request.devices // hw.devices_per_host)
    if hosts < 1 or request.devices % hosts:
        raise ValueError(f"{request.devices} devices do not split evenly over {hosts} hosts; pass --hosts")
    if request.devices // hosts > hw.devices_per_host:
        raise ValueError(f"{request.devices // hosts} devices per host, but a {hw.name} host has at most "
                         f"{hw.devices_per_host}")
    context = request.context if request.context is not None else t.max_position_embeddings
    if not 1 <= context <= t.max_position_embeddings:
        raise ValueError(f"context {context} is outside the model's 1..{t.max_position_embeddings} positions")
    if request.concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {request.concurrency}")
    if request.experts not in EXPERT_FORMATS:
        raise ValueError(f"unknown expert format {request.experts!r}; choose from {list(EXPERT_FORMATS)}")
    if not 0 <= request.reserve < 1:
        raise ValueError(f"the reserve is a share of device memory in [0, 1), got {request.reserve}")
    if request.prefill_chunk < 1:
        raise ValueError(f"the prefill chunk must be at least 1 token, got {request.prefill_chunk}")

    if request.dtype not in DTYPES:
        raise ValueError(f"unknown parameter dtype {request.dtype!r}; choose from {list(DTYPES)}")
    weights = model_weights(config, DTYPES[request.dtype], EXPERT_FORMATS[request.experts])
    counts = parameter_counts(config)
    matmul = active_parameters(config, counts) - counts["embedding"] - counts["norms"]
    model = _ModelNumbers(config, kv_bytes_per_token(config, request.kv_dtype), matmul)
    efficiencies = measured.decode_efficiencies(hw, results)

    def evaluate(lay: Layout) -> Plan:
        return _plan_for(model, request, hosts, context, lay, sharded_bytes(weights, lay), efficiencies)

    if layout is not None:
        lay = load_layout(layout)
        if lay.size != request.devices:
            raise ValueError(f"layout {lay.name} ({lay.describe()}) has {lay.size} devices, not {request.devices}")
        return evaluate(lay)
    plans = []
    for lay in candidate_layouts(request.devices):
        try:
            plans.append(evaluate(lay))
        except LayoutError:
            continue  # the model's sizes do not split this way
    if not plans:
        raise ValueError(f"no mesh of {request.devices} devices splits this model's arrays evenly")
    if not any(p.fits for p in plans):
        return min(plans, key=lambda p: p.weights_bytes_per_device)
    return max(plans, key=lambda p: (min(p.max_concurrent_sequences, request.concurrency), -p.decode_s[1],
                                     -p.weights_bytes_per_device))


@dataclasses.dataclass(frozen=True)
class _ModelNumbers:
    """The config's numbers the rooflines need."""

    config: KimiConfig
    kv_bytes_per_token: int
    matmul_parameters: float
    """Weights one token multiplies with (the active parameters but the embedding lookup and norms)."""

    def attention_flops(self, queries: int, keys_each: float) -> float:
        """FLOPs of ``queries`` query positions attending to ``keys_each`` keys each, all layers:
        absorbed MLA for one query (decode), the expanded form for many (prefill)."""
        t = self.config.text
        if queries == 1:
            per_key = 2 * t.num_attention_heads * (2 * t.kv_lora_rank + t.qk_rope_head_dim)
        else:
            per_key = 2 * t.num_attention_heads * (t.qk_head_dim + t.v_head_dim)
        return t.num_hidden_layers * per_key * queries * keys_each


def _plan_for(model: _ModelNumbers, request: Request, hosts: int, context: int, layout: Layout,
              by_component: dict[str, int], efficiencies: dict[int, float]) -> Plan:
    hw = request.hardware
    weights = sum(by_component.values())
    reserve = int(request.reserve * hw.memory_bytes)
    free = max(0, int(hw.memory_bytes) - reserve - weights)
    data = layout.axis_size("data")
    tokens_per_device = free // model.kv_bytes_per_token  # a device holds the cache of its data group's sequences
    sequences = data * (tokens_per_device // context)
    steps = _Steps(model, request, hosts, layout, by_component)
    batches = (1, request.concurrency)
    roofline = tuple(steps.decode(-(-b // data), context) for b in batches)
    efficiency = tuple(measured.nearest(efficiencies, -(-b // data)) for b in batches) if efficiencies else None
    return Plan(request, hosts, context, layout, by_component, model.kv_bytes_per_token, reserve,
                data * tokens_per_device, sequences, roofline, efficiency, steps.prefill(context))


@dataclasses.dataclass(frozen=True)
class _Steps:
    """Roofline seconds of the steps of one data group (its devices work together on its sequences)."""

    model: _ModelNumbers
    request: Request
    hosts: int
    layout: Layout
    by_component: dict[str, int]

    @property
    def group(self) -> int:
        return self.layout.size // self.layout.axis_size("data")

    def _weight_bytes(self, tokens: int) -> float:
        """Weight bytes a device reads for ``tokens`` tokens: all but the embedding (a row per
        token) and the vision tower, the routed experts that the tokens are expected to choose."""
        t = self.model.config.text
        sizes = self.by_component
        fixed = sum(v for k, v in sizes.items() if k not in ("embedding", "routed_experts", VISION))
        touched = 1 - (1 - t.num_experts_per_tok / t.n_routed_experts) ** tokens if t.n_routed_experts else 0
        return fixed + sizes["routed_experts"] * touched + tokens * t.hidden_size * ACTIVATION_BYTES

    def _link(self, logical: str) -> tuple[int, float]:
        """(ways ``logical`` is split, one-direction bytes/s of the links its collectives use)."""
        axes = self.layout.mesh_axes_of(logical)
        ways = math.prod(self.layout.axis_size(a) for a in axes)
        names = [a for a, _ in self.layout.axes]
        span = math.prod(n for _, n in self.layout.axes[min((names.index(a) for a in axes), default=len(names)):])
        hw = self.request.hardware
        inside = span <= self.request.devices // self.hosts
        return ways, (hw.interconnect_bytes_s if inside else hw.cross_host_bytes_s) / 2

    def _collective_s(self, tokens: int) -> float:
        """Seconds of one step's collectives: the MoE all-to-all (each chosen copy of a token
        there and back), the all-reduces after split heads and split MLPs, the gathered logits."""
        t = self.model.config.text
        row = tokens * t.hidden_size * ACTIVATION_BYTES
        moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
        seconds = 0.0
        ways, rate = self._link("expert")
        if ways > 1:
            seconds += moe_layers * 2 * row * t.num_experts_per_tok * (ways - 1) / ways / ways / rate
        ways, rate = self._link("heads")
        if ways > 1:
            seconds += t.num_hidden_layers * 2 * row * (ways - 1) / ways / rate
        ways, rate = self._link("mlp")
        if ways > 1:
            seconds += t.num_hidden_layers * 2 * row * (ways - 1) / ways / rate
        ways, rate = self._link("vocab")
        if ways > 1:
            seconds += tokens * t.vocab_size * 4 * (ways - 1) / ways / rate
        return seconds

    def _step_s(self, tokens: int, byte_count: float, flops: float) -> float:
        hw = self.request.hardware
        return max(byte_count / hw.hbm_bytes_s, flops / self.group / hw.bf16_flops) + self._collective_s(tokens)

    def decode(self, batch: int, cached: int) -> float:
        """Seconds of one decode step of ``batch`` sequences with ``cached`` tokens each."""
        m = self.model
        cache = batch * cached * m.kv_bytes_per_token
        flops = 2 * batch * m.matmul_parameters + batch * m.attention_flops(1, cached)
        return self._step_s(batch, self._weight_bytes(batch) + cache, flops)

    def prefill(self, length: int) -> float:
        """Seconds to prefill one sequence of ``length`` tokens in chunks."""
        m, chunk = self.model, self.request.prefill_chunk
        seconds = 0.0
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            cache = (start + n) * m.kv_bytes_per_token
            flops = 2 * n * m.matmul_parameters + m.attention_flops(n, start + (n + 1) / 2)
            seconds += self._step_s(n, self._weight_bytes(n) + cache, flops)
        return seconds


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]



def layout_toml(p: Plan) -> str:
    """``p``'s mesh layout as a TOML file that ``--mesh`` accepts: the mesh and every rule
    (INT4 scale groups follow their values' rules)."""
    r = p.request
    lines = [
        f"# Written by `kimi-jax plan`: {r.devices} x {r.hardware.name} on {p.hosts} host(s), "
        f"{r.experts} experts, context {p.context}, concurrency {r.concurrency}.",
        f"# {p.weights_bytes_per_device / 1e9:.2f} GB of weights per device; "
        + (f"room for {p.max_concurrent_sequences} sequences of {p.context} tokens." if p.fits else "it does NOT fit."),
        "[mesh]",
        *(f"{axis} = {n}" for axis, n in p.layout.axes),
        "",
        "[rules]",
        *(f"{logical} = {json.dumps(list(axes))}" for logical, axes in p.layout.rules if not logical.endswith("_groups")),
    ]
    return "\n".join(lines) + "\n"
