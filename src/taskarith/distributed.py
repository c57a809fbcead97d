"""Data-parallel fine-tuning over torch.distributed, as launched by ``torchrun`` (or any launcher, such as
``accelerate launch``, that sets ``WORLD_SIZE``, ``RANK`` and the rendezvous address).

Every rank holds the whole model and draws the same global batch (a pure function of seed and step); each
computes the loss on its own slice, scaled so that summing gradients over ranks gives exactly the
single-process full-batch gradient, and then every rank takes the same optimizer step. Gradients are summed
with ``all_reduce`` rather than through ``DistributedDataParallel``: the tangent-space and tau-Jp paths run
their forward passes through ``torch.func`` rather than the module's ``forward``, which DDP's reducer needs
to see. With one process nothing here does anything, so single-process runs are unchanged bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

__all__ = ["Cluster", "cluster_from_environment"]


@dataclass(frozen=True)
class Cluster:
    """This process's place among the data-parallel workers (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, so ranks never race on the same path."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        return list(items[self.rank :: self.world])

    def share(self, local: int, total: int) -> float:
        """The weight of a loss averaged over ``local`` of ``total`` examples in the global mean."""
        return local / total if self.world > 1 else 1.0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        # One collective over a flat buffer instead of one per tensor: far fewer round trips.
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum_(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def cluster_from_environment() -> Cluster:
    """Join the process group that ``torchrun``/``accelerate launch`` describe in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Cluster()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Cluster(rank=dist.get_rank(), world=dist.get_world_size())


def local_device(device: str) -> str:
    """Under a launcher with GPUs, ``auto`` means this process's own GPU (``cuda:LOCAL_RANK``)."""
    if device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device
