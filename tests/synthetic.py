"""Small synthetic interaction data shared by the tests."""

from __future__ import annotations

import numpy as np


def catalogue_walks(n_users: int, n_items: int, min_len: int, max_len: int, seed: int = 1) -> list[np.ndarray]:
    """Users walk the catalogue in steps of one or two, so the next item is learnable from the last; lengths are
    drawn from [min_len, max_len) + 1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        start, steps = rng.integers(n_items), rng.integers(1, 3, size=rng.integers(min_len, max_len))
        out.append(((start + np.concatenate([[0], np.cumsum(steps)])) % n_items).astype(np.int32))
    return out
