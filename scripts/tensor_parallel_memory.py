"""Per-rank memory of tensor parallelism: the weights and KV bytes per token each rank holds, and its peak
RSS, for a model optimized with tensor_parallel = the number of ranks (inplace=True: the whole
projections released).

    torchrun --nproc-per-node N scripts/tensor_parallel_memory.py [--model smollm2-135m] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import resource

import torch.distributed as dist

import xpu_coopt
from xpu_coopt.checkpoints import load_model
from xpu_coopt.cli import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = parser.parse_args()
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    model, _ = load_model(args.model, DTYPES[args.dtype])
    optimized = xpu_coopt.optimize(model, tensor_parallel=ranks, inplace=True)
    kv = optimized.spec.kv_bytes_per_token(optimized.dtype.itemsize)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"rank {rank}/{ranks}: weights {optimized.weight_bytes() / 2**20:.1f} MiB, KV {kv / 2**10:.1f} KiB a "
          f"token, peak RSS {peak:.2f} GiB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
