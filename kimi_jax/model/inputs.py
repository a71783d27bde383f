"""Checks of the token ids given to the model and the engine.

:func:`check_token_ids` is the one place where ids are checked; ``Kimi.__call__``,
``Kimi.embed_inputs`` / ``Kimi.trace`` and the engine's prompts (:func:`check_prompts`) call it.
It refuses, with an error naming the problem:

- values that are not integer ids (float, bool, string or object arrays): ``TypeError``;
- the wrong rank (``input_ids must be [batch, seq]; got shape (5,)``) and empty input
  (a dimension of size 0): ``ValueError``;
- ids outside ``[0, vocab_size)``, naming the first such value and where it is (batch row
  and position) and how many there are: ``ValueError``.

**Under ``jit``** (ids are tracers: ``nnx.jit(lambda m, x: m(x))``, or arrays spread over
processes that this process cannot read whole) the values cannot be checked on the host.
Shape, rank and dtype still are (they are static); out-of-range ids are then *poisoned*:
every id outside ``[0, vocab_size)``, negative ones included, is replaced by ``vocab_size``,
which the embedding lookup (``jnp.take``'s default ``"fill"`` mode) turns into a NaN
embedding. Attention carries the NaN to every position of that row, so the whole row's
logits are NaN, never plausible numbers: no id wraps around or is clamped to a real token.
Rows without a bad id are computed as usual (tokens never mix across rows). Check with
``jnp.isnan(logits).any()``, or call the model outside ``jit`` (its forward pass is
compiled anyway) to get the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SHAPES = {1: "[seq]", 2: "[batch, seq]"}


def check_token_ids(ids: Any, vocab_size: int, *, where: str = "input_ids", rank: int = 2) -> Any:
    """Checks ``ids`` (an array or nested lists of rank ``rank``) as token ids of a vocabulary
    of ``vocab_size``; returns them as an array to use instead (see the module doc).

    Host values (lists, NumPy arrays) come back as a NumPy array, concrete JAX arrays unchanged,
    traced ones as int32 with out-of-range ids poisoned. ``where`` names the ids in errors.
    """
    if not isinstance(ids, (jax.Array, np.ndarray)):
        try:
            ids = np.asarray(ids)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{where} must be {_SHAPES.get(rank, f'of rank {rank}')} token ids; {e}") from None
    if ids.ndim != rank:
        raise ValueError(f"{where} must be {_SHAPES.get(rank, f'of rank {rank}')}; got shape {tuple(ids.shape)}")
    if ids.size == 0:
        raise ValueError(f"{where} is empty (shape {tuple(ids.shape)}): give at least one token")
    dtype = np.dtype(ids.dtype)
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{where} must hold integer token ids; got dtype {dtype}")
    if isinstance(ids, jax.core.Tracer) or (isinstance(ids, jax.Array) and not ids.is_fully_addressable):
        bad = _out_of_range(jnp, ids, vocab_size)
        return jnp.where(bad, jnp.int32(vocab_size), ids.astype(jnp.int32))
    host = np.asarray(ids)
    bad = _out_of_range(np, host, vocab_size)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        place = ", ".join(f"{name} {i}" for name, i in zip(("batch row", "position")[-rank:], first)) if rank <= 2 \
            else f"index {first}"
        count = int(bad.sum())
        more = f" (and {count - 1} more such ids)" if count > 1 else ""
        raise ValueError(
            f"{where} has token id {host[first]} at {place}, outside the vocabulary [0, {vocab_size}){more}"
        )
    return ids


def check_prompts(prompts: Sequence[Any], vocab_size: int) -> list[list[int]]:
    """The prompts (a sequence of token-id sequences, ragged) as lists of ints, each checked by
    :func:`check_token_ids` as ``prompt {i}``."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray, jax.Array)):
        raise TypeError(f"prompts must be a list of token-id lists; got {type(prompts).__name__}")
    return [check_token_ids(p, vocab_size, where=f"prompt {i}", rank=1).tolist() for i, p in enumerate(prompts)]


def _out_of_range(xp: Any, ids: Any, vocab_size: int) -> Any:
    """Where ``ids`` fall outside ``[0, vocab_size)``, without comparing against a bound the
    dtype cannot hold."""
    info = np.iinfo(ids.dtype)
    bad = ids < 0 if info.min < 0 else xp.zeros(ids.shape, bool)
    return bad | (ids >= vocab_size) if info.max >= vocab_size else bad
