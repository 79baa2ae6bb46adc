"""The CPU backend's 8-bit GEMM (docs/ops.md, "linear_int8"), by the weight's grouping, for 16-bit
activations:
- one group a row (per channel, optimize(weight_dtype="int8")): torch's aten._weight_int8pack_mm for
  x @ codes.T, then each row's float32 scale;
- groups of a multiple of 16 (GGUF Q8_0's 32, Q6_K's 16) where the native kernels are built: the weight
  as it is held (no packed copy, so a GGUF's Q8_0 embeddings serve as its LM head too), up to
  NATIVE_ROWS rows through the native kernel (native.py, cpp/linear_int8.cpp), more through torch's GEMM
  over the weight dequantized NATIVE_CHUNK_ROWS output features at a time;
- without the native kernels, groups of a multiple of 32: the codes split into two 4-bit halves,
  code = 16 hi + lo with hi in [-8, 7] and lo in [0, 15], run as one 4-bit GEMM of 2N rows (gemm_int4:
  torch's int4 kernel) whose two halves are summed;
- other groups, and float32 activations: the weight dequantized each call, then torch's GEMM (float32:
  the format's exact values).
Measured on the 2-core AVX-512 CI machine, 1 row, bfloat16 (docs/ops.md "linear_int8").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xpu_coopt.backends.cpu import gemm_int4, native
from xpu_coopt.quant.int4 import NIBBLE, Int4Weight
from xpu_coopt.quant.int8 import Int8Weight

HALF_SPLIT_GROUP = 32  # the groups the split runs on: torch's int4 kernel takes multiples of 32
HIGH_STEP = 16  # code = HIGH_STEP * hi + lo
NATIVE_GROUP = 16  # the groups the native kernel takes: multiples of its vectors' 16 lanes
# Activation rows the native kernel takes (a decode step's, beams'); it reads the weight once for every 4.
NATIVE_ROWS = 16
# Output features dequantized at a time past NATIVE_ROWS: a 7B LM head's 16-bit copy would be 262 MB.
NATIVE_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class PerChannelInt8:
    """Codes for aten._weight_int8pack_mm (given unit scales in the activations' dtype), and the per-row
    scales in float32, applied to its output: scales rounded to a 16-bit dtype would scale every output
    of a row by the same error (bfloat16: up to 0.4%), which cost SmolLM2 perplexity."""

    codes: torch.Tensor  # int8 [N, K]
    unit_scales: torch.Tensor  # [N] ones in the activations' dtype
    scales: torch.Tensor  # float32 [N]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.unit_scales, self.scales


@dataclass(frozen=True)
class SplitInt8:
    """An 8-bit weight as a 4-bit one of 2N rows: its high halves' rows, then its low halves'."""

    halves: gemm_int4.CpuInt4Weight
    out_features: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.halves.tensors()


@dataclass(frozen=True)
class NativeInt8:
    """A grouped 8-bit weight as it is held, for the native kernel (its tensors contiguous)."""

    weight: Int8Weight

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weight.tensors()


Packed = PerChannelInt8 | SplitInt8 | NativeInt8 | Int8Weight


def pack_int8(weight: Int8Weight, dtype: torch.dtype) -> Packed:
    """The weight as linear_int8 runs it for activations of `dtype` (module docstring)."""
    if dtype == torch.float32:
        return weight
    if weight.group_size == weight.shape[1]:
        scales = weight.scales[:, 0].contiguous()
        return PerChannelInt8(weight.codes.contiguous(), torch.ones_like(scales, dtype=dtype), scales)
    if weight.group_size % NATIVE_GROUP == 0 and native.library() is not None:
        return NativeInt8(weight.contiguous())
    if weight.group_size % HALF_SPLIT_GROUP == 0:
        return SplitInt8(gemm_int4.pack_int4(_as_4_bit_halves(weight), dtype), weight.shape[0])
    return weight


def _as_4_bit_halves(weight: Int8Weight) -> Int4Weight:
    """[N, K] codes c = 16 hi + lo as 2N rows of 4-bit codes: hi + 8 with scale 16 s and offset -128 s
    (value 16 hi s), then lo with scale s and offset 0 (value lo s); both exact in float32."""
    codes = weight.codes.to(torch.int16)
    low = codes & NIBBLE
    high = (codes - low) // HIGH_STEP + gemm_int4.TORCH_INT4_ZERO
    quads = torch.cat((high, low)).to(torch.uint8)
    packed = quads[:, 0::2] | (quads[:, 1::2] << 4)
    scales = torch.cat((HIGH_STEP * weight.scales, weight.scales))
    offsets = torch.cat(
        (-HIGH_STEP * gemm_int4.TORCH_INT4_ZERO * weight.scales, torch.zeros_like(weight.scales))
    )
    return Int4Weight(packed.contiguous(), scales, offsets, weight.group_size)


def linear_int8(x: torch.Tensor, weight: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T + bias, for a weight from pack_int8 for x's dtype."""
    if isinstance(weight, Int8Weight):
        return F.linear(x, weight.dequantize(x.dtype), bias)
    if isinstance(weight, NativeInt8):
        return _linear_native(x, weight.weight, bias)
    if isinstance(weight, SplitInt8):
        both = gemm_int4.linear_int4(x, weight.halves)
        out = both[..., : weight.out_features] + both[..., weight.out_features :]
    else:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # torch's kernel reads rows K apart
        out = torch.ops.aten._weight_int8pack_mm(rows, weight.codes, weight.unit_scales)
        out = (out.float() * weight.scales).to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def _linear_native(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """linear_int8 of a grouped weight held as it is: the native kernel for up to NATIVE_ROWS rows, torch's
    GEMM over parts of the weight dequantized in turn for more."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] <= NATIVE_ROWS:
        out = native.linear_int8(rows, weight.codes, weight.scales, weight.group_size, bias)
    else:
        parts = [
            F.linear(rows, weight.rows(slice(first, first + NATIVE_CHUNK_ROWS)).dequantize(x.dtype))
            for first in range(0, weight.shape[0], NATIVE_CHUNK_ROWS)
        ]
        out = torch.cat(parts, dim=-1)
        out = out if bias is None else out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])
