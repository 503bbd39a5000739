"""Training-free reference points, ranked by the same evaluator and protocol as the trained runs.

- **Popularity**: every user gets the same ranking, by how often each item occurs in the users' training parts
  (everything but the last two items of each sequence: leave-one-out's validation and test targets are left out).
- **Nearest neighbour of the last item**: the cosine between the history's last item and every item, on one
  stored LLM layer. Under RecBole's protocol the last item itself is a candidate and ranks first (cosine 1), as it
  does for the trained models; under MoRec's it is excluded with the rest of the history.

``../shared/data/README.md`` uses the second as the sanity floor: a trained text-based model that does not clearly
beat it has a bug. Ties count against the target, as everywhere (``evaluate.metrics``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluate import DEFAULT_TIES
from evaluate.metrics import full_ranking


def train_part_counts(sequences: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """How often each item occurs in the training parts of the sequences (all but each one's last two items)."""
    parts = [np.asarray(s[:-2], dtype=np.int64) for s in sequences]
    items = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.bincount(items, minlength=n_items).astype(np.float64)


def popularity(counts: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray], *,
               exclude_history: bool = False, ties: str = DEFAULT_TIES, batch_size: int = 4096
               ) -> dict[str, np.ndarray]:
    """Per-user metrics of ranking every item by ``counts`` (one score per item); ``ties`` as in
    ``evaluate.metrics`` (items of equal count tie)."""
    users = torch.ones(len(targets), 1)
    items = torch.as_tensor(np.asarray(counts, dtype=np.float32))[:, None]
    return full_ranking(users, items, torch.as_tensor(targets), histories=histories if exclude_history else None,
                        exclude_history=exclude_history, ties=ties, batch_size=batch_size)


def last_item_neighbour(vectors: torch.Tensor | np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray], *,
                        exclude_history: bool = False, ties: str = DEFAULT_TIES, batch_size: int = 4096
                        ) -> dict[str, np.ndarray]:
    """Per-user metrics of ranking every item by its cosine with the last item of the user's history, on
    ``vectors [n_items, dim]`` (e.g. one stored LLM layer); ``ties`` as in ``evaluate.metrics`` (items with
    identical vectors tie)."""
    if any(len(h) == 0 for h in histories):
        raise ValueError("every history needs at least one item for the last-item neighbour")
    unit = F.normalize(torch.as_tensor(np.asarray(vectors, dtype=np.float32)), dim=-1)
    last = torch.as_tensor(np.fromiter((h[-1] for h in histories), dtype=np.int64, count=len(histories)))
    return full_ranking(unit[last], unit, torch.as_tensor(targets), histories=histories if exclude_history else None,
                        exclude_history=exclude_history, ties=ties, batch_size=batch_size)
