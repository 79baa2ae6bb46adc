"""Command-line overrides of the decode kernel's launch constants, shared by the tuning scripts
(scripts/bench_decode_attention.py times a launch on a GPU, profile_decode_step.py profiles a model's
decode step with it, scripts/decode_kernel_resources.py reads its registers without one)."""

from __future__ import annotations

import argparse
import dataclasses

from xpu_coopt.backends.triton import kernels

# DecodeLaunch fields each set by the option of the same name (block_n sets both cache storages' sizes).
_FIELDS = ("block_t", "num_warps", "num_stages", "max_registers", "programs_per_sm", "min_chunk",
           "fp8_upcast_in_registers")  # fmt: skip


def add_decode_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "decode kernel launch (defaults: xpu_coopt.backends.triton.kernels.DecodeLaunch)"
    )
    group.add_argument("--block-n", type=int, help="keys per block, for every cache storage")
    group.add_argument("--block-t", type=int, help="response steps per block")
    group.add_argument("--num-warps", type=int)
    group.add_argument("--num-stages", type=int)
    group.add_argument("--max-registers", type=int, help="registers a thread at most (Triton's maxnreg)")
    group.add_argument("--programs-per-sm", type=int, help="decode programs wanted per multiprocessor")
    group.add_argument("--min-chunk", type=int, help="prompt columns a split covers at least")
    group.add_argument(
        "--fp8-upcast-in-registers", action="store_true", default=None,
        help="convert the prompt loop's FP8 tiles before Triton moves them into tl.dot's operand layout",
    )  # fmt: skip


def add_device_lengths_argument(parser: argparse.ArgumentParser) -> None:
    """--device-lengths: the scripts then pass the segments' lengths in a device tensor, as the model's
    replayed decode graph does (the kernel's HAS_LENS specialisation)."""
    parser.add_argument(
        "--device-lengths", action="store_true",
        help="pass the segments' lengths in a device tensor, as a decode step replayed in a CUDA graph does",
    )  # fmt: skip


def apply_decode_launch(args: argparse.Namespace) -> kernels.DecodeLaunch:
    """Replaces the decode kernel's launch constants in this process by those given in args; returns them."""
    overrides = {name: value for name in _FIELDS if (value := getattr(args, name)) is not None}
    if args.block_n is not None:
        overrides.update(block_n_16bit=args.block_n, block_n_fp8=args.block_n)
    kernels.DECODE_LAUNCH = dataclasses.replace(kernels.DECODE_LAUNCH, **overrides)
    return kernels.DECODE_LAUNCH
