"""Where training runs: the device, and the torch.distributed process group under torchrun.

One process (the default) trains alone. Under torchrun every process joins the group that
torchrun describes in its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
takes one slice of every global batch; DistributedDataParallel all-reduces the gradients, so
a tied parameter receives the sum over every use on every rank. Rank 0 alone logs and writes.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn


class PlacementError(RuntimeError):
    """A device or process layout this machine cannot provide; the message names the param."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """train.device -> a torch.device. auto: CUDA when present, else Apple's MPS, else CPU."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda":
        if not cuda:
            raise PlacementError("train.device: cuda asked for, but torch sees no CUDA device here; "
                                 "use auto or cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps":
        if not mps:
            raise PlacementError("train.device: mps asked for, but torch sees no MPS device here; use auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def under_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@dataclass(frozen=True)
class Placement:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (the slices cover it exactly once)."""
        return batch.tensor_split(self.world)[self.rank] if self.world > 1 else batch

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def sum(self, *values: torch.Tensor) -> None:
        """In-place sum over ranks of each tensor."""
        if self.world > 1:
            for value in values:
                dist.all_reduce(value)

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start(device: str) -> Placement:
    """This process's placement: alone, or joined to torchrun's process group (gloo on CPU,
    nccl on CUDA)."""
    if not under_torchrun():
        return Placement(resolve_device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    where = resolve_device(device, local_rank)
    if where.type == "mps":
        raise PlacementError("train.device: mps has no torch.distributed backend; use cpu with train.distributed")
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return Placement(where, dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def relaunch(processes: int, module: str, args: list[str]) -> NoReturn:
    """Replace this process by `torchrun --standalone --nproc_per_node=N -m module args`.

    exec, not a child: a SIGTERM to the stage reaches torchrun, which passes it to every worker."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", module, *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
