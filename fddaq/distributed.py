"""Data-parallel runs under `torchrun --nproc-per-node N` (torch.distributed).

Every rank trains on its own batches (seeds offset by the rank; per-rank batch = global batch
/ N); DistributedDataParallel averages the gradients, so N processes take the steps one
process would take at the same global batch. Ranks hold identical models throughout;
evaluation splits the images into one part per rank (`Ranks.part`, then `gather` or
`total`), and rank 0 alone writes outputs. One process (no torchrun) is the plain case of
world size 1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, global_batch: int, name: str) -> int:
        """This rank's part of a global batch (which must split evenly)."""
        if global_batch % self.world:
            raise ConfigError(f"{name}={global_batch} must be a multiple of the {self.world} processes")
        return global_batch // self.world

    def part(self, count: int) -> slice:
        """This rank's contiguous part of `count` items (parts differ by at most one item)."""
        return slice(self.rank * count // self.world, (self.rank + 1) * count // self.world)


def launched() -> Ranks:
    """This process's place in the torchrun job its environment describes (1 process: rank 0 of 1)."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def current() -> Ranks:
    """The joined process group's ranks; rank 0 of 1 when none was joined."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), launched().local_rank)
    return Ranks()


def join(device: torch.device) -> Ranks:
    """Join the torchrun job (NCCL on GPUs, gloo on CPUs) once; nothing for one process."""
    ranks = launched()
    if ranks.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model: nn.Module, ranks: Ranks) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when there are several ranks (buffers are
    not broadcast: frozen BatchNorm statistics and quantizer zero points stay in step by
    construction)."""
    if ranks.world == 1:
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def average(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of `values` over the ranks (in place; returned for convenience)."""
    return total(values, ranks).div_(ranks.world)


def gather(rows: torch.Tensor, count: int, ranks: Ranks) -> torch.Tensor:
    """Every rank's `rows` for its `part(count)`, concatenated in rank order, on every rank
    (on the ranks' device: NCCL gathers GPU tensors)."""
    if ranks.world == 1:
        return rows
    longest = -(-count // ranks.world)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    kept = (Ranks(r, ranks.world).part(count) for r in range(ranks.world))
    return torch.cat([part[: own.stop - own.start] for part, own in zip(parts, kept)])


def total(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum of `values` over the ranks (in place; returned for convenience)."""
    if ranks.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
