"""The job's view of ``torch.distributed``: which rank this is, and which shards it owns.

Under ``torchrun`` (``WORLD_SIZE`` set) the process group is started here if the caller has not
started it: gloo on CPU, nccl when the model is on a GPU. Without ``torchrun`` the job is one
rank of one. Ranks share the output folder (one file system), so rank 0 reads every shard to
merge the metrics: no tensors travel through the process group, only barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job.

    Attributes:
        rank: this process's rank.
        world: the number of processes.
        started_here: whether the job started the process group (and so ends it).
    """

    rank: int
    world: int
    started_here: bool

    def owns(self, shard: int) -> bool:
        """Shards go round-robin: rank ``r`` takes shards ``r, r + world, ...``.

        Example:
            >>> [s for s in range(5) if Ranks(1, 2, False).owns(s)]
            [1, 3]
        """
        return shard % self.world == self.rank

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if the job started it."""
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def join(device: torch.device) -> Ranks:
    """This process's :class:`Ranks`, starting the process group under ``torchrun`` if needed.

    Args:
        device: the model's device; CUDA picks nccl, anything else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), True)


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
