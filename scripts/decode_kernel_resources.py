"""Registers, spills and shared memory of the Triton decode-attention kernel on an NVIDIA GPU, without one.

Compiles segment_attention_decode as the op wrapper launches it (xpu_coopt.backends.triton.offline: Triton's own
launch path, so the same specialisation and code as on the GPU) for sm_<capability>, and reads the
cubin. Registers and shared memory bound how many blocks an SM holds ("blocks/SM": by registers r, by
shared memory s), the grid how many it is given ("waves": programs over the SMs' room for them); the
decode kernel is memory-bound, and fewer warps on an SM mean fewer loads in flight. The prompt loop's
machine code (SASS) is counted too: instructions of one tile ("loop ins"), per key, and single-byte
shared-memory loads (LDS.U8), the measure of the FP8 conversion's cost. The counts depend on the Triton version
(it and its bundled ptxas make the code): compare runs of one version, and use the GPU's (printed).

    python scripts/decode_kernel_resources.py [--kv-dtype auto fp8_e4m3] [--beams 4] [--device-lengths] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ["TRITON_INTERPRET"] = "0"  # before xpu_coopt.backends.triton reads it: compile, do not interpret

import torch
import triton

from xpu_coopt.backends.triton import kernels, offline
from xpu_coopt.backends.triton.tuning import (
    add_decode_launch_arguments,
    add_device_lengths_argument,
    apply_decode_launch,
)
from xpu_coopt.ops import fp8


def compile_decode(args: argparse.Namespace, kv_dtype: str) -> offline.Launch:
    """One decode call of a request of args.beams sequences over a prompt segment of args.context tokens
    (an empty response segment: its code is compiled all the same), compiled for args.capability."""
    storage = torch.uint8 if fp8.is_fp8(kv_dtype) else torch.float16
    sequences, dim = args.beams, args.head_dim
    prompt = torch.zeros((1, args.kv_heads, args.context, dim), dtype=storage)
    response = torch.zeros((sequences, args.kv_heads, 0, dim), dtype=storage)
    prompt_scale = response_scale = None
    if fp8.is_fp8(kv_dtype):
        prompt_scale = torch.zeros(prompt.shape[:-1], dtype=fp8.SCALE_DTYPE)
        response_scale = torch.zeros(response.shape[:-1], dtype=fp8.SCALE_DTYPE)
    query = torch.zeros((sequences, args.heads, dim), dtype=torch.float16)
    with offline.compile_for(args.capability, args.multiprocessors) as launches:
        kernels.ENTRIES.segment_attention_decode(
            torch.empty_like(query), query, prompt, prompt, prompt_scale, prompt_scale,
            torch.zeros(1, dtype=torch.int32), response, response, response_scale, response_scale,
            torch.zeros((sequences, 0), dtype=torch.int32), 0, dim**-0.5, kv_dtype,
            torch.tensor([args.context, 0], dtype=torch.int32) if args.device_lengths else None,
        )  # fmt: skip
    return next(launch for launch in launches if launch.name == "segment_attention_decode_kernel")


def prompt_loop(launch: offline.Launch) -> dict[str, float]:
    """The prompt loop's machine code: its body's instructions (one tile of BLOCK_N keys), per key, and its
    shared-memory loads of single bytes (LDS.U8). The prompt loop is the kernel's one loop with tensor-core
    instructions (HMMA: its tl.dot calls)."""
    loop = next(
        loop for loop in offline.loops(launch.compiled) if any(op.startswith("HMMA") for op in loop.opcodes)
    )
    return {
        "prompt_loop_instructions": loop.instructions,
        "instructions_per_key": loop.instructions / launch.constexprs["BLOCK_N"],
        "shared_byte_loads": loop.opcodes["LDS.U8"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capability", type=int, default=90, help="compute capability: 90 = H100")
    parser.add_argument("--multiprocessors", type=int, default=offline.H100_MULTIPROCESSORS)
    parser.add_argument("--kv-dtype", nargs="+", default=["auto", "fp8_e4m3"])
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--context", type=int, default=8192)
    add_device_lengths_argument(parser)
    add_decode_launch_arguments(parser)
    parser.add_argument("--json")
    args = parser.parse_args()
    launch = apply_decode_launch(args)
    print(f"Triton {triton.__version__}, sm_{args.capability}, decode kernel: {launch}")
    header = ("kv_dtype", "rows", "BLOCK_N", "BLOCK_T", "registers", "stack B", "shared B", "blocks/SM",
              "programs", "waves", "loop ins", "ins/key", "LDS.U8")  # fmt: skip
    print(" ".join(f"{h:>9}" for h in header))
    rows = []
    for kv_dtype in args.kv_dtype:
        compiled = compile_decode(args, kv_dtype)
        usage = offline.resources(compiled.compiled)
        limits = usage.blocks_per_sm(args.capability)
        programs = compiled.grid[0] * compiled.grid[1]
        row = {"kv_dtype": kv_dtype, **{k: compiled.constexprs[k] for k in ("BLOCK_ROWS", "BLOCK_N", "BLOCK_T")},
               **dataclasses.asdict(usage), "blocks_per_sm": limits, "programs": programs,
               "waves": programs / (args.multiprocessors * min(limits.values())), **prompt_loop(compiled)}  # fmt: skip
        rows.append(row)
        cells = (kv_dtype, row["BLOCK_ROWS"], row["BLOCK_N"], row["BLOCK_T"], usage.registers, usage.stack_bytes,
                 usage.shared_bytes, f"{limits['registers']}r/{limits['shared']}s", programs, f"{row['waves']:.2f}",
                 row["prompt_loop_instructions"], f"{row['instructions_per_key']:.1f}", row["shared_byte_loads"])  # fmt: skip
        print(" ".join(f"{c:>9}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "capability": args.capability,
                       "launch": dataclasses.asdict(launch), "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
