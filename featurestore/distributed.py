"""Taking part in a torchrun job: the process group from torchrun's environment, rank and world size, barriers,
object exchange, and a check that a folder is shared by every rank.

torchrun (``torch.distributed.run``) starts one process per GPU (or per CPU slot) and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins that job once
(NCCL when the process runs on a GPU, gloo on CPU). Without torchrun (``WORLD_SIZE`` unset or 1) every
function here is a cheap no-op answering rank 0 of 1, so single-process code paths stay exactly as they were.
Stage two builds on these (``train.distributed``); featurestore imports neither pipeline nor train.
"""

from __future__ import annotations

import atexit
import os
import uuid
from pathlib import Path
from typing import Any

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The torchrun job cannot run as asked (incomplete environment, a folder the ranks do not share)."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset): how many processes torchrun started in all."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={value!r} is not an integer. Fix: launch with torchrun, which sets "
                               "it, or unset it.") from None


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return _dist().get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK, set by torchrun; 0 otherwise): its GPU index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes shared files and prints."""
    return rank() == 0


def _wants_cuda(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_from_env(device: str = "auto") -> bool:
    """Join the torchrun job described by the environment, once; return whether this run is distributed.

    DEVICE is the run's device option: a run that uses a GPU ('auto' with CUDA present, 'cuda', 'cuda:N')
    uses NCCL and binds this process to GPU LOCAL_RANK; otherwise gloo. A no-op returning False when
    WORLD_SIZE is unset or 1, and when a process group already exists it is reused as is.
    """
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = env_world_size()
    if world <= 1:
        return False
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} unset. Fix: start the command with "
                               "`torchrun --nproc-per-node=N -m pipeline.cli ...` (or `make ... NPROC=N`), which "
                               "sets all of them.")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run with one process (NPROC=1)")
    import torch

    if _wants_cuda(device):
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """The device this rank should use for the device option DEVICE: under a multi-process job on GPUs,
    'auto' and 'cuda' mean this rank's GPU ``cuda:LOCAL_RANK``; anything else is returned unchanged."""
    import torch

    if is_distributed() and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return device


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if not is_distributed():
        return
    dist = _dist()
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's OBJ (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank SRC's OBJ on every rank (OBJ is ignored on the others)."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def check_shared_folder(folder: Path, what: str) -> None:
    """Raise DistributedError on every rank unless all ranks see a file rank 0 writes in FOLDER.

    Stage one and stage two write one set of files from several processes (shards from each rank, checkpoints
    from rank 0), so with several machines WHAT (e.g. the store) must be on a filesystem every machine mounts.
    """
    if not is_distributed():
        return
    folder = Path(folder)
    token = f".shared-check-{uuid.uuid4().hex}" if is_main() else None
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / token).touch()
    token = broadcast_object(token)
    seen = all_gather_objects((folder / token).exists())
    if is_main():
        (folder / token).unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise DistributedError(f"{folder}: rank(s) {blind} do not see files rank 0 writes there, so {what} is not "
                               "on a shared filesystem. Fix: set SSNAREC_HOME to a folder every machine mounts "
                               "(NFS, Lustre, ...) or run on one machine.")
