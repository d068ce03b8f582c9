"""The process group, as torchrun describes it in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): one process per worker, gloo on CPU, nccl on GPU. Without torchrun: one
process and none of this."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only this process prints, writes checkpoints and writes the result."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of `value` over all processes (every process gets it)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.size

    def minimum(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def shard(self, batch: Tensor) -> Tensor:
        """This process's equal share of a global batch of indices (its length divides evenly)."""
        share = len(batch) // self.size
        return batch[self.rank * share : (self.rank + 1) * share]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def training_device(name: str | None) -> torch.device:
    """The device one process trains on: `cpu` (default), `cuda` or `cuda:N`, refused by name when
    torch sees no such device (checked before any work)."""
    from rankfold.errors import RankfoldError

    name = "cpu" if name is None else name  # an empty --device is refused, not read as cpu
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RankfoldError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise RankfoldError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RankfoldError(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__}); "
                                "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RankfoldError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                                f"numbered from 0")
    return device


def join_world(device: str | None = None) -> World:
    """The World of this process, joining the process group when torchrun started several (once).
    One process trains on `device` (training_device); under torchrun each process takes the GPU of
    its local rank when there are GPUs."""
    if not launched_by_torchrun():
        return World(device=training_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def leave_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
