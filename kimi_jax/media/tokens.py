"""How many decoder tokens a medium takes: the one place this is computed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def num_media_tokens(grid_thw: Any, merge: int | Sequence[int] = 2) -> Any:
    """Decoder tokens of a medium: ``(H / kh) * (W / kw)`` for the merge kernel ``merge``
    (an int for a square kernel, or ``(kh, kw)``); a video chunk is pooled over time, so T
    does not count. ``grid_thw`` is one ``(T, H, W)`` (returns an int) or ``[M, 3]``
    (returns an int64 array)."""
    kh, kw = (merge, merge) if isinstance(merge, int | np.integer) else tuple(merge)
    g = np.asarray(grid_thw)
    if g.shape[-1:] != (3,) or g.ndim not in (1, 2):
        raise ValueError(f"grid_thw must have shape (3,) or (M, 3), got {g.shape}")
    if not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"grid_thw must be integers, got dtype {g.dtype}")
    h, w = g[..., 1], g[..., 2]
    if np.any(g <= 0) or np.any(h % kh) or np.any(w % kw):
        raise ValueError(f"grid_thw {g.tolist()} must be positive with H divisible by {kh} and W by {kw}")
    n = (h // kh) * (w // kw)
    return int(n) if g.ndim == 1 else n.astype(np.int64)
