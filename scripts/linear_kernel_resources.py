"""Registers, spills and shared memory of the Triton few-row GEMM's launches, plain and fused, on an NVIDIA
GPU, without one.

Compiles each projection of a shape preset (as scripts/bench_linear.py lists them) the way a decode step
launches it: the plain GEMM, and the fused one the model runs (q/k/v, gate/up and the LM head after the
RMSNorm, gate/up with SiLU * up, o_proj and down_proj adding into the residual); xpu_coopt.backends.triton.offline
compiles for sm_<capability> and reads the cubins. Registers and shared memory bound how many blocks an SM
holds (by registers r, by shared memory s), and so the loads in flight of these memory-bound kernels.
"loop ins": the instructions of each loop's body in the machine code (SASS), one K block each; the
normed launches of several rows have two loops, the RMS pass over x and the GEMM. The counts depend on the
Triton version: compare runs of one version.

    python scripts/linear_kernel_resources.py [--model llama-2-7b] [--rows 1 4] [--capability 90]
"""

from __future__ import annotations

import argparse
import os

os.environ["TRITON_INTERPRET"] = "0"  # before xpu_coopt.backends.triton reads it: compile, do not interpret

import torch
import triton
from bench_linear import projection_shapes

from xpu_coopt.backends.triton import linear, offline

# How the model fuses each projection (xpu_coopt/model/decoder.py): after the norm, gated, or adding into the residual.
FUSION = {
    "qkv": "norm",
    "gate_up": "norm+silu",
    "lm_head": "norm",
    "o_proj": "residual",
    "down_proj": "residual",
}


def compile_projection(name: str, n: int, k: int, rows: int, capability: int) -> list[offline.Launch]:
    """The plain and the fused launch of one projection, compiled (float16)."""
    x, weight = torch.zeros(rows, k, dtype=torch.float16), torch.zeros(n, k, dtype=torch.float16)
    with offline.compile_for(capability) as launches:
        linear.linear(x, weight)
        if FUSION[name] == "residual":
            linear.linear_add_(x, weight, None, torch.zeros(rows, n, dtype=torch.float16))
        else:
            gated = FUSION[name] == "norm+silu"
            linear.norm_linear(x, torch.ones(k, dtype=torch.float16), 1e-5, weight, None, gated)
    return launches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--capability", type=int, default=90, help="compute capability: 90 = H100")
    args = parser.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.capability}, {args.model}, float16")
    header = (
        "projection",
        "rows",
        "launch",
        "BLOCK_N",
        "registers",
        "stack B",
        "shared B",
        "blocks/SM",
        "programs",
        "loop ins",
    )
    print(" ".join(f"{h:>10}" for h in header))
    for rows in args.rows:
        for name, n, k, _ in projection_shapes(args.model):
            launches = compile_projection(name, n, k, rows, args.capability)
            for label, launch in zip(("plain", FUSION[name]), launches, strict=True):
                usage = offline.resources(launch.compiled)
                limits = usage.blocks_per_sm(args.capability)
                cells = (name, rows, label, launch.constexprs["BLOCK_N"], usage.registers, usage.stack_bytes,
                         usage.shared_bytes, f"{limits['registers']}r/{limits['shared']}s", launch.grid[0],
                         "+".join(str(loop.instructions) for loop in offline.loops(launch.compiled)
                                  if loop.instructions > 1))  # fmt: skip
                print(" ".join(f"{c:>10}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
