"""Full-ranking evaluation: the rank of each user's target among all items, then Recall@k and NDCG@k.

Protocol (leave-one-out, one target per user): the score of item i for user u is the dot product of their
vectors (pass L2-normalised vectors for cosine). Every item is a candidate; metrics are kept per user so that
paired significance tests are possible, and averaged by the caller.

History items. The default follows RecBole/UniSRec: items already in the user's history stay candidates.
``exclude_history=True`` follows MoRec: history items are removed from the candidates (score -inf), except
the target itself, which is never excluded even when the user interacted with it before. A model with a learned
score for items seen before (``history_bonus``) adds it to those items' scores; they stay candidates.

Ties. ``ties="pessimistic"`` (default) counts every other item scoring >= the target's score as ranked
above it, so rank = 1 + #{i != target : s_i >= s_target}. A constant scorer therefore gets rank N for every
user and no free hits (an evaluator that counts only strictly greater scores gives a constant scorer R@k = 1).
``ties="expected"`` uses the expected rank under a uniformly random order of the tied items,
1 + #greater + #ties / 2 (fractional): the closest model of evaluators built on ``torch.topk`` (RecBole's), whose
order among tied items is unspecified (on CPU it follows no item order). ``ties="index"`` breaks ties by item
index (lower index first), which reproduces evaluators built on a stable sort; it is only meant for comparing
with them.

Ranks are computed by counting, not sorting: O(N) per user in a few vectorised passes, exact at any k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluate import DEFAULT_TIES, METRIC_NAMES, TIE_MODES

__all__ = ["DEFAULT_TIES", "METRIC_NAMES", "TIE_MODES", "add_to_histories", "full_ranking", "mean_metrics", "metric_names", "target_ranks", "topk_metrics"]


def metric_names(ks: Sequence[int] = (10, 50)) -> tuple[str, ...]:
    """Metric keys in the order :func:`topk_metrics` returns them: R@k for every k, then N@k."""
    return tuple(f"R@{k}" for k in ks) + tuple(f"N@{k}" for k in ks)


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude_mask: torch.Tensor | None = None,
    *,
    ties: str = DEFAULT_TIES,
) -> torch.Tensor:
    """1-based rank of each row's target item among all columns of ``scores``.

    Args:
        scores: [B, N] float scores, higher is better. NaN scores never rank above the target; a NaN
            target score ranks below every other non-excluded item.
        targets: [B] int64 column index of each row's target.
        exclude_mask: optional [B, N] bool; True removes that item from the candidates. The target is
            never removed, whatever the mask says.
        ties: "pessimistic" (default: ties count against the target), "expected" (1 + greater + ties/2),
            or "index" (ties broken by item index, lower first). See the module docstring.

    Returns:
        [B] ranks: int64 for "pessimistic" and "index", float32 for "expected".
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties={ties!r} is not one of {TIE_MODES}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    n_rows, n_items = scores.shape
    targets = targets.to(device=scores.device, dtype=torch.long).reshape(-1)
    if targets.numel() != n_rows:
        raise ValueError(f"{targets.numel()} targets for {n_rows} score rows")
    if n_rows and (int(targets.min()) < 0 or int(targets.max()) >= n_items):
        raise ValueError(f"target indices must lie in [0, {n_items}); got {int(targets.min())}..{int(targets.max())}")

    rows = torch.arange(n_rows, device=scores.device)
    own_score = scores[rows, targets].unsqueeze(1)
    target_score = torch.where(torch.isnan(own_score), torch.full_like(own_score, -torch.inf), own_score)

    keep = None
    if exclude_mask is not None:
        if exclude_mask.shape != scores.shape:
            raise ValueError(f"exclude_mask shape {tuple(exclude_mask.shape)} != scores shape {tuple(scores.shape)}")
        keep = ~exclude_mask.to(scores.device)
        keep[rows, targets] = True

    def count(hit: torch.Tensor) -> torch.Tensor:
        if keep is not None:
            hit &= keep
        return hit.sum(dim=1, dtype=torch.int32).long()  # int32 accumulation is faster than the int64 default

    # Items scoring >= the target, the target itself not counted (a NaN target does not count itself).
    at_least = count(scores >= target_score) - (own_score >= target_score).squeeze(1).long()
    if ties == "pessimistic":
        return 1 + at_least
    greater = count(scores > target_score)
    if ties == "expected":
        return 1 + greater.float() + (at_least - greater).float() / 2
    lower_index = torch.arange(n_items, device=scores.device).unsqueeze(0) < targets.unsqueeze(1)
    return 1 + greater + count((scores == target_score) & lower_index)


def topk_metrics(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = (10, 50)) -> dict[str, np.ndarray]:
    """Per-user Recall@k (1 if rank <= k else 0) and NDCG@k (1/log2(rank + 1) if rank <= k else 0).

    With one target per user, Recall@k is the hit rate and the ideal DCG is 1. Keys come in the order of
    :func:`metric_names`; values are float64 arrays with one entry per user.
    """
    r = ranks.detach().cpu().double().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks, np.float64)
    if r.size and r.min() < 1:
        raise ValueError(f"ranks are 1-based; got a rank of {r.min()}")
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"R@{k}"] = (r <= k).astype(np.float64)
    for k in ks:
        out[f"N@{k}"] = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    return out


def flatten_histories(histories: Sequence[np.ndarray], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Flatten per-user histories into (offsets [U + 1], items): user u's items are items[offsets[u]:offsets[u+1]].

    Negative entries (padding) are kept here and skipped when excluding; an index >= n_items is an error.
    """
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    parts = [np.asarray(h, dtype=np.int64).ravel() for h in histories]
    items = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if items.size and items.max() >= n_items:
        user = int(np.repeat(np.arange(len(histories)), lengths)[items >= n_items][0])
        raise ValueError(f"history of user #{user} holds an item index >= n_items ({n_items}); max is {int(items.max())}")
    offsets = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, items


def _history_cells(offsets: np.ndarray, items: np.ndarray,
                   keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) of every history entry of the rows ``offsets`` [B + 1] index into ``items``
    (``flatten_histories``' layout), less padding (negative entries) and each row's ``keep`` item where given."""
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    item = items[offsets[0] : offsets[-1]]
    take = item >= 0
    if keep is not None:
        take &= item != keep[rows]
    return rows[take], item[take]


def exclude_histories(scores: torch.Tensor, offsets: np.ndarray, items: np.ndarray,
                      keep: np.ndarray | None = None) -> None:
    """Set ``scores[u, i] = -inf`` in place for every item i of row u's history (``flatten_histories``' layout
    for these rows: ``offsets`` [B + 1] into ``items``), skipping padding (negative entries) and each row's
    ``keep`` item (the target, where given). Cheaper than a [B, N] mask."""
    rows, item = (torch.from_numpy(a).to(scores.device) for a in _history_cells(offsets, items, keep))
    scores[rows, item] = -torch.inf


def add_to_histories(scores: torch.Tensor, offsets: np.ndarray, items: np.ndarray, value: float) -> None:
    """Add ``value`` in place to ``scores[u, i]`` for every item i of row u's history (layout as in
    :func:`exclude_histories`), once per item however often the history repeats it: a model's learned score
    for items already seen (a repeat bias)."""
    rows, item = (torch.from_numpy(a).to(scores.device) for a in _history_cells(offsets, items))
    # a repeated (row, item) pair writes the same sum twice: each cell gains ``value`` once
    scores[rows, item] = scores[rows, item] + value


def full_ranking(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    targets: torch.Tensor,
    *,
    histories: Sequence[np.ndarray] | None = None,
    exclude_history: bool = False,
    batch_size: int = 4096,
    ks: Sequence[int] = (10, 50),
    ties: str = DEFAULT_TIES,
    history_bonus: tuple[Sequence[np.ndarray], float] | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Rank every item for every user and return per-user R@k and N@k (float64 arrays of length U).

    Scores are ``user_vecs @ item_vecs.T`` in float32 on ``item_vecs``' device, computed for ``batch_size``
    users at a time. ``exclude_history=True`` (MoRec's convention) needs ``histories``: one array of item
    indices per user; the target is never excluded. ``history_bonus`` = (one array of item indices per user,
    value) adds the value to the scores of those items first: a model's learned score for items it has seen in
    the user's history (``train`` ``--history-bias``). See the module docstring for the tie convention.
    """
    if user_vecs.dim() != 2 or item_vecs.dim() != 2 or user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"need user_vecs [U, d] and item_vecs [N, d]; got {tuple(user_vecs.shape)} and {tuple(item_vecs.shape)}")
    n_users, n_items = user_vecs.shape[0], item_vecs.shape[0]
    targets = torch.as_tensor(targets).to("cpu", torch.long).reshape(-1)
    if targets.numel() != n_users:
        raise ValueError(f"{targets.numel()} targets for {n_users} users")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = None
    if exclude_history:
        if histories is None:
            raise ValueError("exclude_history=True needs histories (one array of item indices per user)")
        if len(histories) != n_users:
            raise ValueError(f"{len(histories)} histories for {n_users} users")
        index = flatten_histories(histories, n_items)
    bonus = None
    if history_bonus is not None:
        if len(history_bonus[0]) != n_users:
            raise ValueError(f"{len(history_bonus[0])} bonus histories for {n_users} users")
        bonus = (*flatten_histories(history_bonus[0], n_items), float(history_bonus[1]))

    device = item_vecs.device
    targets_np = targets.numpy()
    items_t = item_vecs.detach().float().t().contiguous()
    ranks = torch.empty(n_users, dtype=torch.float32 if ties == "expected" else torch.long)
    starts = range(0, n_users, batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="ranking", unit="batch", disable=not progress, leave=False):
            stop = min(start + batch_size, n_users)
            scores = user_vecs[start:stop].detach().to(device).float() @ items_t
            if bonus is not None:
                offsets, items, value = bonus
                add_to_histories(scores, offsets[start : stop + 1], items, value)
            if index is not None:          # the target itself is never excluded
                offsets, items = index
                exclude_histories(scores, offsets[start : stop + 1], items, keep=targets_np[start:stop])
            ranks[start:stop] = target_ranks(scores, targets[start:stop], ties=ties).cpu()
    return topk_metrics(ranks, ks)


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Average per-user metric arrays into one float per metric (NaN for an empty array)."""
    return {name: float(np.mean(values)) if len(values) else float("nan") for name, values in per_user.items()}
