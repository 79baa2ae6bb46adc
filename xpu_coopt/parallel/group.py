"""The tensor-parallel group: torch.distributed's default process group (the script's, or one initialized
here from torchrun's environment), on the device's backend (gloo on CPU, nccl on CUDA, xccl on XPU), and
the decoder's two collectives over it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl"}
# A rank that fails leaves the others waiting in a collective: they give up after this long, with an error.
TIMEOUT = timedelta(seconds=float(os.environ.get("XPU_COOPT_TP_TIMEOUT", 600)))


@dataclass(frozen=True)
class TensorParallel:
    size: int
    rank: int

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of each one's partial result (a row-parallel projection's), in place."""
        dist.all_reduce(partial)
        return partial

    def gather_columns(self, shard: torch.Tensor, columns: int) -> torch.Tensor:
        """Every rank's equal-width [..., C] shard side by side along the last dimension, cut to `columns`
        (the LM head's vocabulary, padded to a multiple of the ranks)."""
        shards = [torch.empty_like(shard) for _ in range(self.size)]
        dist.all_gather(shards, shard.contiguous())
        return torch.cat(shards, dim=-1)[..., :columns]

    def share(self, value: Any) -> Any:
        """Rank 0's value (any picklable object) on every rank; the others pass anything."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_seed(self) -> int:
        """A seed drawn on rank 0, the same on every rank: their sampling draws stay in step."""
        return self.share(int(torch.randint(0, 2**62, (1,))) if self.rank == 0 else None)


def check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, not {size!r}")


def tensor_parallel_group(size: int, device: torch.device) -> TensorParallel:
    """The group of `size` ranks this process belongs to; ValueError where there is none of that size."""
    check_size(size)
    if not dist.is_available():
        raise RuntimeError("tensor_parallel needs torch.distributed, which this build of torch lacks")
    backend = BACKENDS.get(device.type)
    if backend is None:
        raise ValueError(f"tensor_parallel runs on cpu, cuda or xpu, not {device.type}")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"tensor_parallel={size} runs one process per rank: start the script with torchrun "
                f"--nproc-per-node {size}, or call torch.distributed.init_process_group first"
            )
        dist.init_process_group(backend, timeout=TIMEOUT)
    world = dist.get_world_size()
    if world != size:
        raise ValueError(f"tensor_parallel={size}, but the process group has {world} ranks")
    return TensorParallel(size, dist.get_rank())
