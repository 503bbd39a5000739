"""Stage two under torchrun: what the training loop needs beyond DistributedDataParallel itself.

The process-group basics (joining the job from torchrun's environment, rank, world size, barriers, object
exchange, the shared-folder check) live in ``featurestore.distributed`` and are re-exported here. Added:

- :func:`gather_rows`: every rank's rows concatenated in rank order, gradients kept (the backward of an
  all-gather sums each row's gradient from every rank back to the rank that computed it), so in-batch
  negatives can be the whole global batch. Ranks may hold different row counts.
- :func:`split_bounds`: the contiguous share of N examples (or items) one rank takes.
- :func:`sum_across`, :func:`max_across`: scalars reduced over ranks (epoch loss, peak memory).

Every function is a no-op (rank 0 of 1) without a process group, so single-process training is unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from featurestore.distributed import (
    DistributedError,
    all_gather_objects,
    barrier,
    broadcast_object,
    check_shared_folder,
    init_from_env,
    is_distributed,
    is_main,
    local_device,
    rank,
    world_size,
)

__all__ = [
    "DistributedError", "all_gather_objects", "barrier", "broadcast_object", "check_shared_folder",
    "gather_rows", "init_from_env", "is_distributed", "is_main", "local_device", "max_across", "rank",
    "split_bounds", "sum_across", "world_size",
]


def _comm_device() -> torch.device:
    """Where collective inputs must live: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def split_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank RANK_'s contiguous share of N things (``np.array_split`` layout: the first
    ``n % world`` ranks take one more)."""
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (rank_ < extra)


def gather_rows(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Each tensor's rows from every rank, concatenated in rank order, and the row where this rank's start.

    All TENSORS have this rank's row count in dim 0 (counts may differ between ranks; rows are padded for the
    collective and cut out again). Gradients flow back through the gather
    (``torch.distributed._functional_collectives.all_gather_single``, the successor of the deprecated
    ``torch.distributed.nn.functional.all_gather``). Without a process group: the tensors as given, 0.
    """
    if not is_distributed():
        return list(tensors), 0
    from torch.distributed._functional_collectives import all_gather_single

    n = int(tensors[0].shape[0])
    if any(int(t.shape[0]) != n for t in tensors):
        raise ValueError(f"gather_rows: row counts differ between tensors: {[tuple(t.shape) for t in tensors]}")
    device = _comm_device()
    counts_t = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(counts_t, torch.tensor([n], dtype=torch.int64, device=device))
    counts = [int(c) for c in counts_t]
    most = max(counts)
    out = []
    for t in tensors:
        padded = t if n == most else torch.cat([t, t.new_zeros((most - n, *t.shape[1:]))])
        gathered = all_gather_single(padded.contiguous(), 0, dist.group.WORLD)
        if any(c != most for c in counts):
            gathered = torch.cat([gathered[r * most:r * most + c] for r, c in enumerate(counts)])
        out.append(gathered)
    return out, sum(counts[:rank()])


def _reduce(value: float, op: dist.ReduceOp) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=op)
    return float(t)


def sum_across(value: float) -> float:
    """VALUE summed over ranks (VALUE itself in a single process)."""
    return _reduce(value, dist.ReduceOp.SUM)


def max_across(value: float) -> float:
    """The largest VALUE of any rank (VALUE itself in a single process)."""
    return _reduce(value, dist.ReduceOp.MAX)
