"""The serving engine: requests come and go in a fixed set of cache slots.

``Engine(model, max_slots=..., max_length=..., prefill_chunk=...)`` owns one compressed MLA cache of
``max_slots`` sequences x ``max_length`` tokens and the per-slot decoding state, all on the
device. :meth:`Engine.submit` queues a request; each :meth:`Engine.step`

1. admits waiting requests into free slots, reusing cached prefixes (below);
2. dispatches one decode step for the running slots: the next token of each is sampled
   on the device with the slot's own temperature, top-p, top-k and seed, and stop ids and
   token budgets are applied there, so a finished slot stops without the host. The step
   computes only the running slots, padded to the smallest of the ``decode_buckets`` that
   holds them: one running sequence costs a one-row step, however many slots the engine
   has. With ``decode_burst`` above 1, while no request waits, is prefilled or is
   constrained, one dispatch runs that many steps back to back on the device (their tokens
   come back together), so the host's work per step is spread over several tokens. Nothing
   in a decode program waits for the host (no conditional, no loop of unknown length: on a
   GPU each would make the host wait for the device mid-dispatch), so the next dispatch is
   queued while one runs. Whether the top-k / top-p filters run (a sort of the vocabulary) is decided on the
   host from the running requests' settings;
3. dispatches one prefill chunk of each of the oldest admitted requests (up to
   ``prefill_rows``; a last chunk samples its request's first token), so running sequences
   keep producing tokens while prompts are read;
4. reads the tokens of the *previous* step: the device works on this step meanwhile.

**Compilation.** Shapes are fixed per engine (slots, cache length, chunk, decode buckets;
per bucket a decode program with and one without the filters, twice with bursts), the steps take
numpy arrays of fixed dtypes, and every step returns the slot state in the shardings it
takes, so each step compiles once. :meth:`Engine.warm_up` (run by the first step) compiles
them all: afterwards no request compiles anything, whatever its prompt length, sampling
settings, seed, stop ids, budget or reused prefix, and whatever its media: the vision tower
runs outside the steps on a request's media padded to one of a few patch counts (the
``media_buckets``, one program each), and the prefill step splices its features into the
chunks' embeddings.

**Prefix reuse.** The engine remembers which tokens each slot's cache holds (the prompt
and the fed tokens of its last request). A new request takes the free slot whose cache
shares the longest prefix with its prompt and prefills only the rest; when a busy slot
shares a longer prefix (a system prompt and tool declarations shared by many agents), that
slot's cache is copied into a free one first. Media placeholders are never reused (two
prompts with equal placeholder ids may carry different images).

**Token masks.** A request may carry a :class:`TokenConstraint` (a grammar for tool-call
arguments, say): before each of its tokens the engine asks it for a bitmask of the allowed
ids and applies it to the logits on the device, in the same sampling. While such a request
runs, each step's tokens are read before the next step is dispatched (the next mask depends
on them); without one, nothing is masked, copied or waited for.

Rows are independent (attention stays within a slot; routing is per token), so greedy
output equals what a request produces alone, wherever and whenever it was admitted (in
float32; in bfloat16 a reused prefix written by decode steps can differ in the last bits
from a fresh prefill of the same tokens).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.inference.sampling import filters, sample_rows
from kimi_jax.inference.steps import key_block_for
from kimi_jax.media.placeholders import check_expanded
from kimi_jax.model.cache import KVCache
from kimi_jax.model.inputs import check_prompts
from kimi_jax.model.kimi import Kimi, media_grids
from kimi_jax.model.mla import absorbed_is_cheaper
from kimi_jax.model.vision import (
    Grid,
    PatchLayout,
    VisionConfig,
    check_pixel_values,
    pad_media,
    project_bucketed,
)
from kimi_jax.parallel.placement import Parallel, to_host

MAX_STOP_IDS = 16
"""Stop ids a request may give (the slot state holds a fixed-size row of them)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Everything the compiled steps carry per slot ([S] = one entry per slot), on the device."""

    cache: KVCache
    last: jax.Array  # [S] int32: the token a running slot feeds next
    active: jax.Array  # [S] bool: the slot is decoding
    produced: jax.Array  # [S] int32: tokens emitted by the slot's request
    budget: jax.Array  # [S] int32: the most tokens it may emit
    stops: jax.Array  # [S, MAX_STOP_IDS] int32, -1 where unused
    temperature: jax.Array  # [S] float32 (0: greedy)
    top_p: jax.Array  # [S] float32 (1: off)
    top_k: jax.Array  # [S] int32 (0: off)
    keys: jax.Array  # [S, 2] uint32: the request's PRNG key data; token t uses fold_in(key, t)
    allowed: jax.Array  # [S, ceil(V / 32)] uint32: bit v % 32 of word v // 32 set where token v may be sampled

    @classmethod
    def create(cls, cache: KVCache, vocab_size: int) -> SlotState:
        S = cache.batch
        return cls(
            cache, jnp.zeros((S,), jnp.int32), jnp.zeros((S,), bool), jnp.zeros((S,), jnp.int32),
            jnp.zeros((S,), jnp.int32), jnp.full((S, MAX_STOP_IDS), -1, jnp.int32), jnp.zeros((S,), jnp.float32),
            jnp.ones((S,), jnp.float32), jnp.zeros((S,), jnp.int32), jnp.zeros((S, 2), jnp.uint32),
            jnp.asarray(all_allowed(S, vocab_size)),
        )


def all_allowed(rows: int, vocab_size: int) -> np.ndarray:
    """A bitmask [rows, ceil(vocab_size / 32)] (uint32) that allows every token."""
    return np.full((rows, -(-vocab_size // 32)), 0xFFFFFFFF, np.uint32)


class TokenConstraint(Protocol):
    """What a request's ``constraint`` provides: ``mask()`` is the bitmask of the tokens the
    next one may be (uint32 or int32 [ceil(V / 32)], bit ``v % 32`` of word ``v // 32`` for
    token ``v``; a shorter mask disallows the ids past its end), or ``None`` for any token;
    ``accept(token)`` is called with each token the request produced."""

    def mask(self) -> np.ndarray | None: ...

    def accept(self, token: int) -> None: ...


def _apply_mask(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """``logits`` [n, V] with the tokens that ``allowed`` [n, ceil(V / 32)] excludes set to
    ``-inf`` (always applied: one elementwise pass, where a conditional would wait for the host)."""
    bits = (allowed[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    keep = bits.reshape(allowed.shape[0], -1)[:, : logits.shape[-1]].astype(bool)
    return jnp.where(keep, logits, -jnp.inf)


def _emit(slots: SlotState, logits: jax.Array, rows: jax.Array, emitting: jax.Array, *,
          filtered: bool = True) -> tuple[SlotState, jax.Array, jax.Array]:
    """Samples a token for slots ``rows`` [n] from ``logits`` [n, V] where ``emitting`` [n]
    (``filtered``: see :func:`~kimi_jax.inference.sampling.sample_rows`); applies stop ids and
    budgets. Returns the state, the tokens [n] (-1 where not emitting) and which of them
    finished their request [n]."""
    keys = jax.vmap(lambda data, t: jax.random.fold_in(jax.random.wrap_key_data(data), t))(
        slots.keys[rows], slots.produced[rows]
    )
    logits = _apply_mask(logits.astype(jnp.float32), slots.allowed[rows])
    tokens = sample_rows(logits, keys, slots.temperature[rows], slots.top_p[rows], slots.top_k[rows],
                         filtered=filtered)
    produced = slots.produced[rows] + emitting
    stop = (tokens[:, None] == slots.stops[rows]).any(-1) | (produced >= slots.budget[rows])
    finished = emitting & stop
    slots = dataclasses.replace(
        slots,
        last=slots.last.at[rows].set(jnp.where(emitting, tokens, slots.last[rows])),
        active=slots.active.at[rows].set((slots.active[rows] | emitting) & ~finished),
        produced=slots.produced.at[rows].set(produced),
    )
    return slots, jnp.where(emitting, tokens, -1), finished


def _placed(slots: SlotState, parallel: Parallel | None) -> SlotState:
    """``slots`` with every array split over the batch axes by its slot axis, as
    ``Parallel.place_batch`` placed them: each step returns the state in the shardings it
    takes, so no step meets a state it was not compiled for."""
    if parallel is None:
        return slots
    return jax.tree.map(lambda a: parallel.constrain(a, ("batch",) + (None,) * (a.ndim - 1)), slots)


class Hashed:
    """A static argument whose hash is computed once: jit hashes its static arguments at every
    call, and a model's ``GraphDef`` takes about 0.2 ms to hash (a decode step's whole budget
    at small batches is a few ms)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Hashed) and self._hash == other._hash and (
            self.value is other.value or self.value == other.value)


def _merge(graphdef: nnx.GraphDef | Hashed, state: nnx.State):
    return nnx.merge(graphdef.value if isinstance(graphdef, Hashed) else graphdef, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "key_block", "burst", "filtered"), donate_argnames="slots")
def decode_step(graphdef: nnx.GraphDef | Hashed, state: nnx.State, slots: SlotState, rows: jax.Array | None, *,
                key_block: int, burst: int = 1, filtered: bool = True):
    """One token for each active slot among ``rows`` [n] (distinct slots; None: all): fed,
    attended, sampled. The other slots are not computed, nor their caches read: a step costs
    what its ``n`` rows do (one program per ``n``, see ``Engine(decode_buckets=)``).
    Returns (state, tokens [S], finished [S]), -1 / False for the slots that emitted nothing.
    ``filtered``: see :func:`~kimi_jax.inference.sampling.sample_rows`.

    With ``burst`` > 1 the program runs ``burst`` such steps back to back, with no host work
    between tokens, and returns tokens and finished [burst, S] (a slot whose request ends
    emits nothing in the later steps). Nothing in the program waits for the host (no
    conditional, no loop of unknown length), so the host can queue the next dispatch while
    this one runs."""
    model = _merge(graphdef, state)
    if burst == 1:
        return _decode(model, slots, rows, key_block, filtered)

    def one(i, carry):
        slots, tokens, finished = carry
        slots, t, f = _decode(model, slots, rows, key_block, filtered)
        return slots, tokens.at[i].set(t), finished.at[i].set(f)

    S = slots.active.shape[0]
    init = (slots, jnp.full((burst, S), -1, jnp.int32), jnp.zeros((burst, S), bool))
    return jax.lax.fori_loop(0, burst, one, init)


def _decode(model, slots: SlotState, rows: jax.Array | None, key_block: int, filtered: bool):
    S = slots.active.shape[0]
    every = rows is None
    rows = jnp.arange(S) if every else rows
    active = slots.active[rows]
    logits, cache = model.extend(slots.last[rows][:, None], active.astype(jnp.int32), slots.cache, absorbed=True,
                                 key_block=key_block, rows=None if every else rows)
    slots, tokens, finished = _emit(dataclasses.replace(slots, cache=cache), logits, rows, active, filtered=filtered)
    if not every:
        tokens = jnp.full((S,), -1, jnp.int32).at[rows].set(tokens)
        finished = jnp.zeros((S,), bool).at[rows].set(finished)
    return _placed(slots, model.parallel), tokens, finished


@functools.partial(
    jax.jit, static_argnames=("graphdef", "absorbed", "key_block"), donate_argnames="slots"
)
def prefill_step(
    graphdef: nnx.GraphDef | Hashed, state: nnx.State, slots: SlotState, rows: jax.Array, ids: jax.Array,
    media: tuple[tuple[jax.Array, ...], jax.Array] | None, counts: jax.Array, final: jax.Array, *, absorbed: bool,
    key_block: int,
):
    """Appends ``counts[i]`` tokens of ``ids`` [P, T] to the cache of slot ``rows[i]``
    (distinct slots, updated in place; a row with count 0 is left as it is); a row whose
    ``final`` chunk this is samples its request's first token. ``media`` (None: no media) is P feature arrays [T, D]
    and a mask [P, T]: where the mask holds, the features replace the tokens' embeddings.
    Returns (state, tokens [S], finished [S]), -1 / False for the slots that emitted nothing."""
    model = _merge(graphdef, state)
    embeds = None
    if media is not None:
        features, is_media = media
        embeds = model.embed(ids)
        embeds = jnp.where(is_media[..., None], jnp.stack(features).astype(embeds.dtype), embeds)
        ids = None
    logits, cache = model.extend(ids, counts, slots.cache, absorbed=absorbed, key_block=key_block,
                                 inputs_embeds=embeds, rows=rows)
    slots, tokens, finished = _emit(dataclasses.replace(slots, cache=cache), logits, rows, final)
    S = slots.active.shape[0]
    return (_placed(slots, model.parallel), jnp.full((S,), -1, jnp.int32).at[rows].set(tokens),
            jnp.zeros((S,), bool).at[rows].set(finished))


@functools.partial(jax.jit, static_argnames="parallel", donate_argnames="slots")
def admit_step(
    slots: SlotState, slot, length, budget, stops, temperature, top_p, top_k, keys, *, parallel: Parallel | None = None
) -> SlotState:
    """Prepares slot ``slot`` for a new request whose first ``length`` tokens are cached already
    (``parallel``: the model's, for the state's shardings)."""
    cache = dataclasses.replace(slots.cache, lengths=slots.cache.lengths.at[slot].set(length))
    return _placed(dataclasses.replace(
        slots, cache=cache, active=slots.active.at[slot].set(False), produced=slots.produced.at[slot].set(0),
        budget=slots.budget.at[slot].set(budget), stops=slots.stops.at[slot].set(stops),
        temperature=slots.temperature.at[slot].set(temperature), top_p=slots.top_p.at[slot].set(top_p),
        top_k=slots.top_k.at[slot].set(top_k), keys=slots.keys.at[slot].set(keys),
    ), parallel)


@functools.partial(jax.jit, static_argnames="parallel", donate_argnames="slots")
def deactivate_step(slots: SlotState, slot: jax.Array, *, parallel: Parallel | None = None) -> SlotState:
    """Stops slot ``slot`` from decoding (a cancelled request)."""
    return _placed(dataclasses.replace(slots, active=slots.active.at[slot].set(False)), parallel)


@functools.partial(jax.jit, static_argnames="parallel", donate_argnames="slots")
def copy_slot_step(slots: SlotState, src: jax.Array, dst: jax.Array, *, parallel: Parallel | None = None) -> SlotState:
    """Copies slot ``src``'s cached latents into slot ``dst`` (for a shared prefix)."""
    runs = jax.tree.map(lambda a: a.at[dst].set(a[src]), slots.cache.runs)
    return _placed(dataclasses.replace(slots, cache=dataclasses.replace(slots.cache, runs=runs)), parallel)


@functools.partial(jax.jit, static_argnames="parallel", donate_argnames="slots")
def mask_step(slots: SlotState, allowed: jax.Array, *, parallel: Parallel | None = None) -> SlotState:
    """Replaces every slot's token bitmask."""
    return _placed(dataclasses.replace(slots, allowed=allowed), parallel)


@jax.jit
def key_data_step(seed: jax.Array) -> jax.Array:
    """The key data [2] (uint32) of ``jax.random.key(seed)`` for a ``seed`` (uint32), made on
    the device by one program for every seed."""
    return jax.random.key_data(jax.random.key(seed))


@functools.partial(jax.jit, static_argnames="graphdef")
def media_step(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: jax.Array, layout: PatchLayout) -> jax.Array:
    """The features [B // G, D] (vision tower and projector, in the embeddings' dtype) of media
    padded to a bucket of B patches (``kimi_jax.model.vision.pad_media``); the first rows,
    one per placeholder, are the media's. One program per bucket, which :meth:`Engine.warm_up`
    compiles ahead of time. ``graphdef`` / ``state`` are ``nnx.split`` of the
    :class:`~kimi_jax.model.Kimi` model."""
    model = nnx.merge(graphdef, state)
    features = project_bucketed(model.vision_tower, model.mm_projector, pixel_values, layout)
    return features.astype(model.language_model.embed_tokens[...].dtype)


@functools.partial(jax.jit, static_argnames="parallel")
def media_rows_step(
    features: jax.Array, index: jax.Array, rows: jax.Array, *, parallel: Parallel | None = None
) -> jax.Array:
    """``rows`` [T, D] with row ``i`` replaced by row ``index[i]`` of ``features`` [M, D] where
    that is >= 0: a prefill chunk's positions take their features (replicated over the mesh,
    as the engine's rows without media are)."""
    rows = jnp.where(index[:, None] >= 0, features[jnp.maximum(index, 0)], rows)
    return rows if parallel is None else jax.lax.with_sharding_constraint(rows, parallel.sharding((None, None)))


MAX_DEFAULT_MEDIA_BUCKET = 32768
"""The largest default media bucket (patches): it holds any medium of K2.5's own preprocessing
(an image is at most about 17.7K patches, a 4-frame video chunk about 21.5K)."""


def default_media_buckets(vision: VisionConfig, max_length: int) -> tuple[int, ...]:
    """Powers of two of patches from 256 (or fewer, for a short ``max_length``) up to the first
    that holds the largest medium of ``max_length`` tokens (a video chunk of ``pos_emb_time``
    frames: tokens x kh x kw x frames patches), at most :data:`MAX_DEFAULT_MEDIA_BUCKET`."""
    kh, kw = vision.merge_kernel_size
    top = min(MAX_DEFAULT_MEDIA_BUCKET, 1 << (max_length * kh * kw * vision.pos_emb_time - 1).bit_length())
    return tuple(1 << k for k in range(min(8, top.bit_length() - 1), top.bit_length()))


_STEPS = (decode_step, prefill_step, admit_step, deactivate_step, copy_slot_step, mask_step, key_data_step,
          media_rows_step)


def default_decode_buckets(max_slots: int) -> tuple[int, ...]:
    """Powers of 8 below ``max_slots``, and ``max_slots`` (64 slots: 1, 8, 64): a decode step
    computes at most 8x the rows it needs. Padding rows read no cache and no expert, so they
    cost little beyond their share of the dense matmuls; below 8 slots one bucket serves."""
    return tuple(8**k for k in range(max_slots.bit_length()) if 8**k < max_slots and max_slots >= 8) + (max_slots,)


def _compilations() -> int:
    return sum(f._cache_size() for f in _STEPS)


@dataclasses.dataclass(eq=False)
class Request:
    """One submitted generation: ``token_ids`` grow as the engine steps; ``done`` and
    ``finish_reason`` (``"stop"`` or ``"length"``) tell when and why it ended."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_ids: tuple[int, ...]
    engine: Engine = dataclasses.field(repr=False)
    on_token: Callable[[int], None] | None = dataclasses.field(default=None, repr=False)
    constraint: TokenConstraint | None = dataclasses.field(default=None, repr=False)
    media: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(default=None, repr=False)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    cached_prefix: int = 0
    """Prompt tokens found in the cache at admission (not prefilled again)."""

    def stream(self) -> Iterator[int]:
        """Yields the request's tokens as they arrive, stepping the engine as needed."""
        seen = 0
        while True:
            while seen < len(self.token_ids):
                yield self.token_ids[seen]
                seen += 1
            if self.done:
                return
            self.engine.step()


@dataclasses.dataclass
class _Prefill:
    """A request being prefilled: its slot, the next prompt position and, with media, each
    run of the vision tower's features [M, D] and the row of them each prompt position takes
    (-1: none)."""

    request: Request
    slot: int
    cursor: int
    media: list[tuple[jax.Array, np.ndarray]] = dataclasses.field(default_factory=list)


class Engine:
    """Continuous batching over ``max_slots`` cache slots of ``max_length`` tokens.

    The mesh comes with the model (``kimi_jax.load(..., mesh=...)``): the cache's slots are
    split over the layout's batch axes. ``prefill_chunk`` is the prompt tokens fed per step
    to each of up to ``prefill_rows`` requests being prefilled (their chunks run together);
    ``cache_dtype`` the cache's dtype; ``key_block`` overrides the attention key block
    (``kimi_jax.inference.steps.key_block_for``). The first :meth:`step` compiles every step
    (:meth:`warm_up`).

    ``media_buckets`` (models with a vision tower) are the patch counts the vision tower runs
    at (default :func:`default_media_buckets`). A request's media run, in order, in as few
    runs as fit the largest bucket, each padded to the smallest bucket that holds it; a
    medium larger than the largest bucket is refused. Each bucket costs one program and,
    with XLA attention, [N, B, B] float32 scores while it runs.

    ``decode_buckets`` are the numbers of rows a decode step may compute (default
    :func:`default_decode_buckets`): a step runs the running slots padded to the smallest
    bucket that holds them (per bucket a program with and one without the top-k / top-p
    filters, and as many for bursts). When the layout splits the slots over
    devices, every step computes every slot (one bucket, ``max_slots``). ``decode_burst`` is
    the decode steps one dispatch runs while nothing else is scheduled (default 1: one per
    :meth:`step`). A burst spreads the host's work per step (about 0.2 ms of Python) over
    several tokens: worth it where a step takes little longer than that (small models on a
    CPU), at the price of two more decode programs per bucket to compile. On an H100 a
    4-layer K2.5 cut decoded as fast without (benchmarks/RESULTS.md).
    """

    def __init__(
        self, model: Kimi, *, max_slots: int = 8, max_length: int = 4096, prefill_chunk: int = 256,
        prefill_rows: int = 4, cache_dtype: jnp.dtype = jnp.bfloat16, key_block: int | None = None,
        media_buckets: Sequence[int] | None = None, decode_buckets: Sequence[int] | None = None,
        decode_burst: int = 1,
    ):
        cfg = model.config.text
        for name, value in (("max_slots", max_slots), ("max_length", max_length), ("prefill_chunk", prefill_chunk),
                            ("prefill_rows", prefill_rows), ("decode_burst", decode_burst)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_length > cfg.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's context (max_position_embeddings = "
                f"{cfg.max_position_embeddings})"
            )
        self.model, self.config, self.vision = model, cfg, model.vision_config
        self.placeholder_id = model.config.media_placeholder_token_id
        self.max_slots, self.max_length = max_slots, max_length
        self.chunk = min(prefill_chunk, max_length)
        self.prefill_rows = min(prefill_rows, max_slots)
        self.graphdef, self.state = nnx.split(model.language_model)
        self._graph = Hashed(self.graphdef)
        self._whole = nnx.split(model) if self.vision is not None else None
        self._absorbed_prefill = absorbed_is_cheaper(cfg, self.chunk)
        parallel = model.parallel
        split = parallel is not None and math.prod(
            parallel.mesh.shape[a] for a in parallel.layout.mesh_axes_of("batch")) > 1
        if decode_buckets is None:
            decode_buckets = (max_slots,) if split else default_decode_buckets(max_slots)
        if (not decode_buckets or max(decode_buckets) != max_slots
                or not all(isinstance(b, int | np.integer) and 0 < b <= max_slots for b in decode_buckets)):
            raise ValueError(f"decode_buckets must be ints in [1, max_slots = {max_slots}], the largest max_slots; "
                             f"got {decode_buckets!r}")
        if split and tuple(decode_buckets) != (max_slots,):
            raise ValueError("the layout splits the slots over devices: every decode step computes every slot "
                             f"(decode_buckets=({max_slots},)), got {decode_buckets!r}")
        self.decode_buckets: tuple[int, ...] = tuple(sorted({int(b) for b in decode_buckets}))
        self._every_row = split  # decode steps take rows=None: all slots, in place on each device
        self.decode_burst = decode_burst
        self._bursts = sorted({1, decode_burst})  # one step while prefills interleave, else decode_burst
        self._decode_blocks = {b: key_block_for(cfg, b, 1, max_length, key_block) for b in self.decode_buckets}
        self._prefill_block = key_block_for(cfg, self.prefill_rows, self.chunk, max_length, key_block)
        self._cache_dtype, self._parallel = jnp.dtype(cache_dtype), model.parallel
        self._slots = self._empty_slots()
        self._no_media = None  # the features of a prefill row without media
        self.media_buckets: tuple[int, ...] = ()
        self._media_programs: dict[int, jax.stages.Compiled] = {}  # bucket -> media_step, compiled by warm_up
        if self.vision is not None:
            buckets = default_media_buckets(self.vision, max_length) if media_buckets is None else media_buckets
            if not buckets or not all(isinstance(b, int | np.integer) and b > 0 for b in buckets):
                raise ValueError(f"media_buckets must be positive ints, got {media_buckets!r}")
            self.media_buckets = tuple(sorted({int(b) for b in buckets}))
            embed = model.language_model.embed_tokens[...]
            zeros = np.zeros((self.chunk, cfg.hidden_size), embed.dtype)
            self._no_media = jax.device_put(  # committed, as the media's features are (_media_step)
                zeros, embed.sharding if self._parallel is None else self._parallel.sharding((None, None))
            )
        self._masks = all_allowed(max_slots, cfg.vocab_size)  # what the device's slots.allowed holds
        self._masks_clear = True
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: collections.deque[_Prefill] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request decoding there
        self._free = list(range(max_slots))
        self._cached: list[list[int]] = [[] for _ in range(max_slots)]  # tokens each slot's cache holds
        self._pending: list[tuple[jax.Array, jax.Array, list[Request | None]]] = []
        self._next_id = 0
        self._stats = {"prefilled_tokens": 0, "reused_tokens": 0, "decoded_tokens": 0, "steps": 0, "decode_steps": 0}
        self._compiled_at_start = _compilations()
        self._warm = False

    def _empty_slots(self) -> SlotState:
        """An empty slot state, split over the batch axes as the steps keep it (:func:`_placed`)."""
        cache = KVCache.create(self.config, self.max_slots, self.max_length, self._cache_dtype)
        slots = SlotState.create(cache, self.config.vocab_size)
        return slots if self._parallel is None else self._parallel.place_batch(slots)

    def warm_up(self) -> None:
        """Compiles every step a request can need, by running each on the empty state with
        arguments that change nothing a request sees, and the vision tower at each media bucket
        ahead of time (compiled, not run: its attention is quadratic in the bucket). The first
        :meth:`step` calls it; later calls do nothing.

        A round of the steps is run again while it compiles something: tracing the model may
        import a module that changes jit's cache keys (``kimi_jax.kernels.grouped`` imports
        tokamax where first traced), and the steps traced before must then compile again."""
        if self._warm:
            return
        for bucket in self.media_buckets:
            none = np.zeros((0, 3, self.vision.patch_size, self.vision.patch_size), np.float32)
            lowered = media_step.lower(*self._whole, *pad_media(none, (), self.vision, bucket))
            self._media_programs[bucket] = lowered.compile()
        slot = 0  # every slot is free: the first step calls this before admitting any request
        for _ in range(3):
            compiled = _compilations()
            self._prepare_slot(slot, cached=0, budget=0)
            self._slots = copy_slot_step(self._slots, np.int32(slot), np.int32(slot), parallel=self._parallel)
            self._slots = mask_step(self._slots, self._masks, parallel=self._parallel)
            self._slots = deactivate_step(self._slots, np.int32(slot), parallel=self._parallel)
            for bucket, burst, filtered in itertools.product(self.decode_buckets, self._bursts, (False, True)):
                self._slots = self._decode(list(range(bucket)), burst, filtered)[0]
            self._prefill_chunks()  # no request: every row feeds nothing
            for program in self._media_programs.values():  # a chunk's rows from (zero) features of each bucket
                out = program.out_info
                features = jax.device_put(np.zeros(out.shape, out.dtype), self._no_media.sharding)
                media_rows_step(features, np.full(self.chunk, -1, np.int32), self._no_media, parallel=self._parallel)
            if _compilations() == compiled:
                break
        self._warm = True

    # ---- requests

    def submit(
        self, prompt_ids: Sequence[int], *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
        top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None,
        pixel_values: np.ndarray | None = None, grid_thws: np.ndarray | None = None,
        constraint: TokenConstraint | None = None,
    ) -> Request:
        """Queues a request; it is admitted at a later :meth:`step`.

        ``temperature`` 0 is greedy; ``top_p`` 1 and ``top_k`` 0 are off; ``seed`` makes
        sampling reproducible whatever else runs. The request ends after one of
        ``stop_ids`` (at most :data:`MAX_STOP_IDS`, the stop token included in its output),
        after ``max_new_tokens``, or when its slot is full. ``on_token(token_id)`` is called
        as each token arrives. Media: ``pixel_values`` / ``grid_thws`` for a prompt holding
        one ``<|media_pad|>`` per media token (ValueError for a medium larger than the largest
        of ``media_buckets``). ``constraint`` restricts each token to those its mask allows
        (:class:`TokenConstraint`).
        """
        [prompt] = check_prompts([prompt_ids], self.config.vocab_size)
        if len(prompt) > self.max_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens, more than the engine's max_length {self.max_length}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        stops = tuple(sorted({int(s) for s in stop_ids}))
        if len(stops) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids per request, got {len(stops)}")
        media = None
        grids = media_grids(self.vision, pixel_values, grid_thws)
        if not grids and self.placeholder_id is not None and self.placeholder_id in prompt:
            raise ValueError(
                f"the prompt holds media placeholders (<|media_pad|>, id {self.placeholder_id}) but no media "
                "were given (pass pixel_values and grid_thws)"
            )
        if grids:
            placeholders = int((np.asarray(prompt) == self.placeholder_id).sum())
            check_expanded(placeholders, grids, self.vision.merge_kernel_size)
            check_pixel_values(np.shape(pixel_values), grids, self.vision)
            self._media_runs(grids)  # refuses a medium larger than the largest bucket
            media = (np.asarray(pixel_values), np.asarray(grid_thws).reshape(-1, 3))
        request = Request(
            self._next_id, prompt, max_new_tokens, float(temperature), float(top_p), top_k, int(seed), stops,
            self, on_token, constraint, media,
        )
        self._next_id += 1
        self._waiting.append(request)
        return request

    def run(self) -> None:
        """Steps until every submitted request is done."""
        while self._waiting or self._prefilling or self._running or self._pending:
            self.step()

    def stats(self) -> dict[str, int]:
        """Tokens prefilled, reused from the cache and decoded; scheduling steps and decode steps
        (a burst counts each of its steps); compilations of the steps since creation (the
        vision tower's programs, compiled ahead of time by :meth:`warm_up`, apart)."""
        return {**self._stats, "compilations": _compilations() - self._compiled_at_start,
                "running": len(self._running), "waiting": len(self._waiting) + len(self._prefilling),
                "free_slots": len(self._free)}

    # ---- one scheduling step

    def step(self) -> None:
        """Admit, decode the running slots, feed one prefill chunk, then read the previous step's tokens."""
        self.warm_up()
        self._admit()
        constrained = bool(self._constrained())
        if constrained:  # the masks follow the tokens so far: read every dispatched step first
            pending, self._pending = self._pending, []
            for tokens, finished, owners in pending:
                self._collect(tokens, finished, owners)
        self._update_masks()
        dispatched = []
        if self._running:
            alone = not (self._waiting or self._prefilling or constrained)  # nothing to interleave
            burst = self.decode_burst if alone else 1
            filtered = any(filters(r.temperature, r.top_p, r.top_k) for r in self._running.values())
            self._slots, tokens, finished = self._decode(sorted(self._running), burst, filtered)
            self._stats["decode_steps"] += burst
            owners = [self._running.get(s) for s in range(self.max_slots)]
            dispatched.append((tokens, finished, owners))
        if self._prefilling:
            out = self._prefill_chunks()
            if out is not None:
                dispatched.append(out)
        self._stats["steps"] += 1
        previous, self._pending = self._pending, dispatched
        for tokens, finished, owners in previous:
            self._collect(tokens, finished, owners)
        if not dispatched or constrained:  # nothing new runs, or the next masks need these tokens
            pending, self._pending = self._pending, []
            for tokens, finished, owners in pending:
                self._collect(tokens, finished, owners)

    def _decode(self, slots: list[int], burst: int, filtered: bool):
        """Dispatches ``burst`` decode steps (:func:`decode_step`: a program per bucket, burst
        and ``filtered``) for ``slots`` (ascending) padded with other slots (which are not
        decoding, so feed nothing) to the smallest decode bucket that holds them."""
        if self._every_row:
            rows, bucket = None, self.max_slots
        else:
            bucket = next(b for b in self.decode_buckets if b >= len(slots))
            chosen = set(slots)
            rows = np.asarray(slots + [s for s in range(self.max_slots) if s not in chosen][: bucket - len(slots)],
                              np.int32)
        return decode_step(self._graph, self.state, self._slots, rows, key_block=self._decode_blocks[bucket],
                           burst=burst, filtered=filtered)

    def _constrained(self) -> dict[int, Request]:
        """Slot -> request for the requests with a constraint that are prefilling or running."""
        found = {s: r for s, r in self._running.items() if r.constraint is not None}
        found.update((job.slot, job.request) for job in self._prefilling if job.request.constraint is not None)
        return found

    def _update_masks(self) -> None:
        """Sets each slot's bitmask (its constrained request's mask, else all tokens) on the
        device, if any changed since last set."""
        constrained = self._constrained()
        if not constrained and self._masks_clear:
            return
        masks = all_allowed(self.max_slots, self.config.vocab_size)
        for slot, request in constrained.items():
            mask = request.constraint.mask()
            if mask is not None:
                mask = np.asarray(mask).view(np.uint32)[: masks.shape[1]]
                masks[slot] = 0
                masks[slot, : len(mask)] = mask
        if not np.array_equal(masks, self._masks):
            self._slots = mask_step(self._slots, masks, parallel=self._parallel)
            self._masks = masks
            self._masks_clear = bool((masks == 0xFFFFFFFF).all())

    def _admit(self) -> None:
        while self._waiting and self._free:
            request = self._waiting.popleft()
            reusable = self._reusable(request.prompt_ids, request.media is not None)
            slot, prefix = self._best_free_slot(reusable)
            donor, donor_prefix = self._best_busy_slot(reusable)
            if donor is not None and donor_prefix > prefix:
                self._slots = copy_slot_step(self._slots, np.int32(donor), np.int32(slot), parallel=self._parallel)
                prefix = donor_prefix
            self._free.remove(slot)
            prefix = min(prefix, len(request.prompt_ids) - 1)  # the last prompt token is always fed
            budget = min(request.max_new_tokens, self.max_length - len(request.prompt_ids) + 1)
            self._prepare_slot(slot, prefix, budget, request.stop_ids, request.temperature, request.top_p,
                               request.top_k, request.seed)
            request.cached_prefix = prefix
            self._stats["reused_tokens"] += prefix
            self._cached[slot] = list(request.prompt_ids[:prefix])
            job = _Prefill(request, slot, prefix)
            if request.media is not None:
                job.media = self._media_features(request)
            self._prefilling.append(job)

    def _prepare_slot(
        self, slot: int, cached: int, budget: int, stop_ids: Sequence[int] = (), temperature: float = 0.0,
        top_p: float = 1.0, top_k: int = 0, seed: int = 0,
    ) -> None:
        """Sets slot ``slot``'s decoding state for a request whose first ``cached`` tokens are in
        its cache (every argument a numpy value of a fixed dtype, so that one program serves all)."""
        stops = np.full(MAX_STOP_IDS, -1, np.int32)
        stops[: len(stop_ids)] = stop_ids
        key = key_data_step(np.uint32(seed % 2**32))
        self._slots = admit_step(
            self._slots, np.int32(slot), np.int32(cached), np.int32(budget), stops, np.float32(temperature),
            np.float32(top_p), np.int32(min(top_k, self.config.vocab_size)), key, parallel=self._parallel,
        )

    def _reusable(self, tokens: Sequence[int], has_media: bool) -> list[int]:
        """The leading tokens whose cache entries another request may share (none past a media placeholder)."""
        tokens = list(tokens)
        if has_media and self.placeholder_id in tokens:
            return tokens[: tokens.index(self.placeholder_id)]
        return tokens

    def _best_free_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot sharing the longest cached prefix with ``prompt`` (an empty one on a tie)."""
        best = max(self._free, key=lambda s: (_common_prefix(self._cached[s], prompt), -len(self._cached[s])))
        return best, _common_prefix(self._cached[best], prompt)

    def _best_busy_slot(self, prompt: list[int]) -> tuple[int | None, int]:
        busy = [s for s in range(self.max_slots) if s not in self._free]
        if not busy:
            return None, 0
        shared = {s: _common_prefix(self._slot_tokens(s), prompt) for s in busy}
        best = max(busy, key=shared.__getitem__)
        return best, shared[best]

    def _slot_tokens(self, slot: int) -> list[int]:
        """The tokens slot ``slot``'s cache is known to hold: a running request's prompt and
        every token fed so far (built when asked: not per decoded token), else ``_cached``."""
        request = self._running.get(slot)
        if request is not None and request.media is None:
            return request.prompt_ids + request.token_ids[:-1]
        return self._cached[slot]

    def _media_runs(self, grids: Sequence[Grid]) -> list[tuple[int, int, int]]:
        """Media ``grids`` split, in order, into runs of the vision tower that fit the largest
        media bucket: (first medium, end, the smallest bucket holding the run's patches).
        ValueError for a medium larger than the largest bucket."""
        largest = self.media_buckets[-1]
        runs, first, patches = [], 0, 0
        for i, (t, h, w) in enumerate(grids):
            n = t * h * w
            if n > largest:
                raise ValueError(
                    f"medium {i} (grid {(t, h, w)}) has {n} patches, more than the engine's largest media bucket "
                    f"({largest} patches; media_buckets={list(self.media_buckets)})"
                )
            if patches + n > largest:
                runs.append((first, i, patches))
                first, patches = i, 0
            patches += n
        runs.append((first, len(grids), patches))
        return [(a, b, min(x for x in self.media_buckets if x >= size)) for a, b, size in runs]

    def _media_step(self, pixel_values: np.ndarray, layout: PatchLayout) -> jax.Array:
        """:func:`media_step` (its program for the bucket of ``pixel_values``), the features
        committed where the rows without media are: one program of each later step then takes
        the rows of chunks with and without media."""
        features = self._media_programs[len(pixel_values)](self._whole[1], pixel_values, layout)
        return jax.device_put(features, self._no_media.sharding)

    def _media_features(self, request: Request) -> list[tuple[jax.Array, np.ndarray]]:
        """Runs the vision tower on the request's media (:meth:`_media_runs`): each run's
        features [B // G, D] and the row of them each prompt position takes (-1: none)."""
        pixel_values, grid_thws = request.media
        grids = media_grids(self.vision, pixel_values, grid_thws)
        placeholders = np.flatnonzero(np.asarray(request.prompt_ids) == self.placeholder_id)
        out, patch, token = [], 0, 0
        for first, end, bucket in self._media_runs(grids):
            run = grids[first:end]
            n, m = sum(t * h * w for t, h, w in run), sum(self.vision.num_tokens(g) for g in run)
            features = self._media_step(*pad_media(pixel_values[patch : patch + n], run, self.vision, bucket))
            rows = np.full(len(request.prompt_ids), -1, np.int32)
            rows[placeholders[token : token + m]] = np.arange(m)
            out.append((features, rows))
            patch, token = patch + n, token + m
        return out

    def _prefill_chunks(self):
        """Feeds the next chunk of the oldest ``prefill_rows`` requests being prefilled; those on
        their last chunk start decoding."""
        T, P = self.chunk, self.prefill_rows
        jobs = list(self._prefilling)[:P]
        spare = [s for s in range(self.max_slots) if s not in {job.slot for job in jobs}]
        rows = np.array([job.slot for job in jobs] + spare[: P - len(jobs)], np.int32)  # spare rows feed nothing
        counts = np.zeros(P, np.int32)
        final = np.zeros(P, bool)
        ids = np.zeros((P, T), np.int32)
        features, is_media = [self._no_media] * P, np.zeros((P, T), bool)
        for i, job in enumerate(jobs):
            prompt = job.request.prompt_ids
            n = counts[i] = min(T, len(prompt) - job.cursor)
            final[i] = job.cursor + n == len(prompt)
            ids[i, :n] = prompt[job.cursor : job.cursor + n]
            for run, feature_rows in job.media:
                index = np.full(T, -1, np.int32)
                index[:n] = feature_rows[job.cursor : job.cursor + n]
                if (index >= 0).any():
                    is_media[i] |= index >= 0
                    features[i] = media_rows_step(run, index, features[i], parallel=self._parallel)
        media = None if self.vision is None else (tuple(features), is_media)
        self._slots, tokens, finished = prefill_step(
            self._graph, self.state, self._slots, rows, ids, media, counts, final,
            absorbed=self._absorbed_prefill, key_block=self._prefill_block,
        )
        owners: list[Request | None] = [None] * self.max_slots
        for i, job in enumerate(jobs):
            request = job.request
            job.cursor += int(counts[i])
            self._stats["prefilled_tokens"] += int(counts[i])
            self._cached[job.slot] = self._reusable(request.prompt_ids, request.media is not None)[: job.cursor]
            if final[i]:
                self._prefilling.remove(job)
                self._running[job.slot] = request
                owners[job.slot] = request
        return (tokens, finished, owners) if final.any() else None

    def _collect(self, tokens: jax.Array, finished: jax.Array, owners: list[Request | None]) -> None:
        """Hands a step's tokens ([S], or [steps, S] from a burst) to their requests and frees the
        slots of finished ones, then calls the ``on_token`` callbacks (an exception in one leaves
        the engine consistent)."""
        tokens, finished = np.atleast_2d(to_host(tokens)), np.atleast_2d(to_host(finished))
        callbacks = []
        for row, slot in np.argwhere(tokens >= 0):  # steps in order
            request = owners[slot]
            if request is None or request.done:  # done: cancelled meanwhile
                continue
            token = int(tokens[row, slot])
            request.token_ids.append(token)
            self._stats["decoded_tokens"] += 1
            if request.constraint is not None:
                request.constraint.accept(token)
            if finished[row, slot]:
                self._cached[slot] = self._slot_tokens(slot)
                request.done = True
                request.finish_reason = "stop" if token in request.stop_ids else "length"
                del self._running[slot]
                self._free.append(slot)
            if request.on_token is not None:
                callbacks.append((request.on_token, token))
        for callback, token in callbacks:
            callback(token)

    # ---- ending requests early

    def cancel(self, request: Request) -> None:
        """Ends ``request`` now (``finish_reason`` ``"cancelled"``) and frees its slot."""
        if request.done:
            return
        if request in self._waiting:
            self._waiting.remove(request)
        for job in list(self._prefilling):
            if job.request is request:
                self._prefilling.remove(job)
                self._free.append(job.slot)
        for slot, running in list(self._running.items()):
            if running is request:
                self._cached[slot] = self._slot_tokens(slot)
                self._slots = deactivate_step(self._slots, np.int32(slot), parallel=self._parallel)
                del self._running[slot]
                self._free.append(slot)
        request.done, request.finish_reason = True, "cancelled"

    def reset(self) -> None:
        """Cancels every request and starts from an empty cache (also after a failed step,
        whose donated state cannot be used again)."""
        for request in [*self._waiting, *(job.request for job in self._prefilling), *self._running.values()]:
            request.done, request.finish_reason = True, "cancelled"
        self._slots = self._empty_slots()
        self._masks = all_allowed(self.max_slots, self.config.vocab_size)
        self._masks_clear = True
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        self._pending = []
        self._free = list(range(self.max_slots))
        self._cached = [[] for _ in range(self.max_slots)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n

