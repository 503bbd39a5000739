"""From chronological user sequences to training, validation and test examples (leave-one-out).

For a user with items s_0 … s_{n−1} (n ≥ 3): the last item is the test target, the second last the validation
target, and every prefix of the rest is a training example (UniSRec's rows): target s_t with history
s_{max(0, t−L)} … s_{t−1} for t = 1 … n−3, where L is the history length (50 in the paper). Nothing is stored
twice: examples are (user, target position) pairs over one concatenated item array, and batches are cut from it
with vectorised indexing and padded on the right to the longest history in the batch.

With several processes (torchrun), every rank draws the same shuffled order from the same (seed, epoch)
generator and takes a contiguous share of each global batch (``batches(..., rank=, world=)``, a
DistributedSampler over batches): the ranks' shares together are exactly the single-process batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """A right-padded batch: ``history[i, :lengths[i]]`` are real items (padding is item 0, never read)."""

    history: torch.Tensor   # [B, L] int64 item_idx
    lengths: torch.Tensor   # [B] int64, ≥ 1
    targets: torch.Tensor   # [B] int64 item_idx
    users: torch.Tensor     # [B] int64 user_idx
    total: int | None = None  # examples in the global batch this rank's share belongs to (None: the whole batch)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.history, self.lengths, self.targets, self.users)),
                     total=self.total)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def real(self) -> torch.Tensor:
        """``[B, L]`` True at real (non-padding) history positions."""
        steps = torch.arange(self.history.shape[1], device=self.history.device)
        return steps[None, :] < self.lengths[:, None]

    def history_mask(self, n_items: int) -> torch.Tensor:
        """``[B, n_items]`` True where the item is among the sequence's real history items."""
        real = self.real()
        rows = torch.arange(len(self), device=self.history.device)[:, None].expand_as(self.history)
        mask = torch.zeros(len(self), n_items, dtype=torch.bool, device=self.history.device)
        mask[rows[real], self.history[real]] = True
        return mask

    def touched(self) -> torch.Tensor:
        """Every item the batch reads, with repeats: the real history items in order, then the ``B`` targets."""
        return torch.cat([self.history[self.real()], self.targets])


class Examples:
    """A set of (user, target position) examples over concatenated sequences."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, users: np.ndarray, positions: np.ndarray,
                 max_len: int):
        self.items, self.offsets, self.max_len = items, offsets, max_len
        self.users = users.astype(np.int64)
        self.positions = positions.astype(np.int64)
        self.lengths = np.minimum(self.positions, max_len)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def batch(self, index: np.ndarray) -> Batch:
        """Examples ``index`` as one batch, padded to its longest history."""
        users, pos, lengths = self.users[index], self.positions[index], self.lengths[index]
        target_at = self.offsets[users] + pos
        width = int(lengths.max())
        steps = np.arange(width)
        real = steps[None, :] < lengths[:, None]
        gather = np.where(real, (target_at - lengths)[:, None] + steps[None, :], 0)
        history = np.where(real, self.items[gather], 0)
        return Batch(torch.from_numpy(history.astype(np.int64)), torch.from_numpy(lengths.copy()),
                     torch.from_numpy(self.items[target_at].astype(np.int64)), torch.from_numpy(users.copy()))

    def targets(self) -> np.ndarray:
        """Each example's target item."""
        return self.items[self.offsets[self.users] + self.positions]

    def histories(self) -> list[np.ndarray]:
        """Each example's whole history, every item before its target, as an array: what MoRec-style evaluation
        excludes from the candidates. Longer than the model's input (the last ``max_len``) for long histories."""
        starts = self.offsets[self.users]
        return [self.items[s:s + n] for s, n in zip(starts, self.positions, strict=True)]

    def inputs(self) -> list[np.ndarray]:
        """Each example's history as the model reads it: the last ``max_len`` items before the target."""
        ends = self.offsets[self.users] + self.positions
        return [self.items[e - n:e] for e, n in zip(ends, self.lengths, strict=True)]

    def shard(self, rank: int, world: int) -> Examples:
        """Rank RANK's contiguous share of the examples among WORLD ranks (``np.array_split`` layout)."""
        index = np.array_split(np.arange(len(self)), world)[rank]
        return Examples(self.items, self.offsets, self.users[index], self.positions[index], self.max_len)

    def n_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        """How many batches ``batches(batch_size, ..., world=world, drop_last=drop_last)`` yields."""
        full, rest = divmod(len(self), batch_size)
        return full + int(rest > 0 and not drop_last and rest >= world)

    def batches(self, batch_size: int, rng: np.random.Generator | None = None, bucket: bool = False,
                drop_last: bool = False, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """All examples once, in batches: shuffled by ``rng`` (in order when None); ``bucket`` groups similar
        lengths (shuffle, sort within windows of 50 batches, shuffle the batches).

        With WORLD > 1 every rank must pass an identically seeded ``rng``; each global batch of ``batch_size``
        is split into WORLD contiguous shares and this yields share RANK (its ``total`` is the global batch
        size). A last global batch with fewer examples than ranks is dropped, so no rank gets an empty share.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        order = np.arange(len(self)) if rng is None else rng.permutation(len(self))
        if bucket and rng is not None:
            window = batch_size * 50
            order = np.concatenate([chunk[np.argsort(self.lengths[chunk], kind="stable")]
                                    for chunk in np.array_split(order, max(1, len(order) // window))])
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if drop_last and chunks and len(chunks[-1]) < batch_size:
            chunks.pop()
        if bucket and rng is not None:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        for chunk in chunks:
            if world == 1:
                yield self.batch(chunk)
            elif len(chunk) >= world:
                share = self.batch(np.array_split(chunk, world)[rank])
                share.total = len(chunk)
                yield share


@dataclass
class Split:
    """Leave-one-out split of every user's sequence."""

    train: Examples
    valid: Examples
    test: Examples
    n_items: int
    n_users: int


def leave_one_out(sequences: Sequence[np.ndarray], n_items: int, max_len: int = 50) -> Split:
    """Derive the split; users with fewer than 3 items are an error (the dataset layer filters them)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    if len(lengths) == 0:
        raise ValueError("no user sequences")
    short = np.flatnonzero(lengths < 3)
    if short.size:
        raise ValueError(f"{short.size} users have fewer than 3 items (first: user_idx {short[0]}); "
                         "leave-one-out needs at least 3 (re-run `ssnarec data prepare`)")
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    if items.min() < 0 or items.max() >= n_items:
        raise ValueError(f"item_idx outside 0..{n_items - 1} in sequences")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    users = np.arange(len(lengths))
    n_train = lengths - 3                                   # targets at positions 1 … n−3
    train_users = np.repeat(users, n_train)
    train_pos = np.arange(n_train.sum()) - np.repeat(np.cumsum(n_train) - n_train, n_train) + 1
    return Split(
        train=Examples(items, offsets, train_users, train_pos, max_len),
        valid=Examples(items, offsets, users, lengths - 2, max_len),
        test=Examples(items, offsets, users, lengths - 1, max_len),
        n_items=n_items, n_users=len(lengths),
    )
