"""The CPU backend's 4-bit GEMM (docs/ops.md, "linear_int4"): torch's int4 kernel for 16-bit activations,
the weight dequantized per call for float32 ones.

torch's CPU kernel (aten._weight_int4pack_mm_for_cpu, the one gpt-fast and torchao use) computes
weight = (q - 8) * scale + zero with scale and zero in the activations' dtype: an Int4Weight's
q * s + o is that with zero = o + 8 s, rounded once to that dtype. Measured on the 2-core AVX-512 CI
machine, 1 row, bfloat16: SmolLM2's q/k/v [960, 576] 20 us against 49 us for the 16-bit GEMV, Llama-2-7B's
gate/up [22016, 4096] 2.8 ms against 11.7 ms. In float32 the same kernel takes 15x the 16-bit GEMV's time
(675 us for [960, 576]), so float32 activations, the mode that checks accuracy, dequantize the weight in
float32 each call instead: the format's exact values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xpu_coopt.quant.int4 import Int4Weight, unpack_codes

# torch's int4 kernel reads codes offset by 8 (signed 4-bit values stored unsigned), and takes a number of
# output features divisible by 16: others are padded with zero rows, whose outputs are dropped.
TORCH_INT4_ZERO = 8
TORCH_INT4_ROWS = 16
# The group sizes torch's kernel takes; a weight's groups of a multiple of one are given to it as that many
# groups of that size with equal scales (exact: the same scale and zero over the same columns).
TORCH_INT4_GROUPS = (256, 128, 64, 32)
# Rows packed at a time: torch's packing takes int32 codes (4 bytes a weight), which for a whole 7B gate/up
# would be 360 MB at once. It lays out each 64 rows on their own (checked: chunks of any multiple of 64 give
# the same bytes), so a multiple of 64 keeps the result and bounds the transient to 16 MB at K = 4096.
PACK_ROWS = 1024


@dataclass(frozen=True)
class CpuInt4Weight:
    """An Int4Weight in torch's CPU int4 layout, for activations of `dtype` (opaque: linear_int4 reads it)."""

    packed: torch.Tensor  # uint8 [N, K/2], torch's order
    scales_and_zeros: torch.Tensor  # [K/G, N, 2] in dtype
    group_size: int
    out_features: int
    input_order: torch.Tensor | None = None  # Int4Weight.input_order

    def tensors(self) -> tuple[torch.Tensor, ...]:
        held = (self.packed, self.scales_and_zeros)
        return held if self.input_order is None else (*held, self.input_order)


def pack_int4(weight: Int4Weight, dtype: torch.dtype) -> CpuInt4Weight | Int4Weight:
    """The weight as linear_int4 runs it for activations of `dtype`: torch's layout for 16-bit ones, the
    Int4Weight itself for float32."""
    if dtype == torch.float32:
        return weight
    group = next((g for g in TORCH_INT4_GROUPS if weight.group_size % g == 0), None)
    if group is None:
        raise ValueError(
            f"the CPU backend's 4-bit GEMM takes groups of a multiple of 32 input features for {dtype} "
            f"activations; this weight has groups of {weight.group_size} (float32 activations take any)"
        )
    repeats = weight.group_size // group
    padding = -weight.shape[0] % TORCH_INT4_ROWS
    packed = torch.cat([_packed_rows(weight.codes[start : start + PACK_ROWS], start + PACK_ROWS >= weight.shape[0],
                                     padding) for start in range(0, weight.shape[0], PACK_ROWS)])  # fmt: skip
    zeros = weight.offsets + TORCH_INT4_ZERO * weight.scales
    pairs = torch.stack((weight.scales, zeros), dim=-1).repeat_interleave(repeats, dim=1)
    scales_and_zeros = F.pad(pairs, (0, 0, 0, 0, 0, padding))
    scales_and_zeros = scales_and_zeros.transpose(0, 1).to(dtype).contiguous()
    return CpuInt4Weight(packed, scales_and_zeros, group, weight.shape[0], weight.input_order)


def _packed_rows(codes: torch.Tensor, last: bool, padding: int) -> torch.Tensor:
    """Some rows' codes (uint8 [rows, K/2], Int4Weight's) in torch's packed layout; the last rows padded
    with `padding` zero rows."""
    unpacked = unpack_codes(codes).to(torch.int32)
    if last and padding:
        unpacked = F.pad(unpacked, (0, 0, 0, padding))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked, 1)


def linear_int4(
    x: torch.Tensor, weight: CpuInt4Weight | Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ weight.T + bias, for a weight from pack_int4 for x's dtype."""
    if isinstance(weight, Int4Weight):
        return F.linear(x, weight.dequantize(x.dtype), bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # torch's kernel reads rows K apart
    if weight.input_order is not None:
        rows = rows.index_select(1, weight.input_order)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        rows, weight.packed, weight.group_size, weight.scales_and_zeros
    )
    if out.shape[-1] != weight.out_features:
        out = out[:, : weight.out_features]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.out_features)
