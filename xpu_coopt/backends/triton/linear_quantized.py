"""x @ W.T (+ bias) for a 4- or 8-bit weight (docs/ops.md, "linear_int4", "linear_int8"), in Triton.

A decode step's few rows (up to MAX_ROWS) run skinny_quantized_kernel: each program owns BLOCK_N output
features and walks K a pair of columns at a time, reading each weight code once and dequantizing it in
registers, exactly as the Int4Weight or Int8Weight defines it (code * scale (+ offset) in float32). A
4-bit byte holds columns 2i and 2i + 1 (an 8-bit weight's pair is two bytes), so x is read as its even
and odd columns, and the two halves' products summed: no interleave. The scale (and offset) of a pair's
group are gathered per pair (groups are even, so both codes share one). More rows (prefill) dequantize
the weight once to the activation dtype and run torch's GEMM: compute-bound there.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from xpu_coopt.backends.triton.kernels import INTERPRETED, upcast_dot
from xpu_coopt.quant import gemm
from xpu_coopt.quant.quantized_linear import QuantizedWeight

MAX_ROWS = 16  # one tl.dot tile of rows


@triton.jit
def _dot_or_sum(a, w, acc, DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ w.T: tl.dot for several rows, elementwise for one (DOT=False: acc [BLOCK_N, BLOCK_B])."""
    if DOT:
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
    else:
        acc += w * a.to(tl.float32)
    return acc


@triton.jit
def skinny_quantized_kernel(out, x, codes, scales, offsets, bias, rows, N, K, group_size, out_stride,
                            x_stride, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                            UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_B: tl.constexpr):  # fmt: skip
    """out[:rows, :N] = x[:rows] @ W.T (+ bias), W = codes * scales + offsets per group (Int4Weight,
    BITS=4) or codes * scales (Int8Weight, BITS=8). BLOCK_B: pairs of columns of K a step."""
    columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = columns < N
    row_ids = tl.arange(0, BLOCK_M)
    in_rows = row_ids < rows
    byte_ids = tl.arange(0, BLOCK_B)
    half = K // 2
    groups = K // group_size
    code_rows = codes + columns.to(tl.int64)[:, None] * (half if BITS == 4 else K)
    x_rows = x + row_ids.to(tl.int64)[:, None] * x_stride
    acc_even = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) if DOT else tl.zeros((BLOCK_N, BLOCK_B), tl.float32)
    acc_odd = tl.zeros_like(acc_even)
    for b0 in range(0, half, BLOCK_B):
        b = b0 + byte_ids
        in_k = b < half
        mask = in_n[:, None] & in_k[None, :]
        group = (2 * b) // group_size
        at = columns.to(tl.int64)[:, None] * groups + group[None, :]
        scale = tl.load(scales + at, mask=mask, other=0.0)
        if BITS == 4:
            packed = tl.load(code_rows + b[None, :], mask=mask, other=0).to(tl.int32)
            offset = tl.load(offsets + at, mask=mask, other=0.0)
            w_even = (packed & 15).to(tl.float32) * scale + offset
            w_odd = (packed >> 4).to(tl.float32) * scale + offset
        else:
            w_even = tl.load(code_rows + 2 * b[None, :], mask=mask, other=0).to(tl.float32) * scale
            w_odd = tl.load(code_rows + 2 * b[None, :] + 1, mask=mask, other=0).to(tl.float32) * scale
        x_mask = in_rows[:, None] & in_k[None, :]
        a_even = tl.load(x_rows + 2 * b[None, :], mask=x_mask, other=0.0)
        a_odd = tl.load(x_rows + 2 * b[None, :] + 1, mask=x_mask, other=0.0)
        acc_even = _dot_or_sum(a_even, w_even, acc_even, DOT, UPCAST_DOT)
        acc_odd = _dot_or_sum(a_odd, w_odd, acc_odd, DOT, UPCAST_DOT)
    result = acc_even + acc_odd if DOT else tl.sum(acc_even + acc_odd, axis=1)[None, :]
    if HAS_BIAS:
        result += tl.load(bias + columns, mask=in_n, other=0.0).to(tl.float32)[None, :]
    out_pointers = out + row_ids.to(tl.int64)[:, None] * out_stride + columns[None, :]
    tl.store(out_pointers, result.to(out.dtype.element_ty), mask=in_rows[:, None] & in_n[None, :])


@dataclasses.dataclass(frozen=True)
class QuantizedLaunch:
    dot: bool
    block_n: int
    block_b: int
    num_warps: int = 4
    num_stages: int = 3


# Not yet tuned on a GPU (issue 36): one row elementwise over long K blocks, several through tl.dot.
ONE_ROW = QuantizedLaunch(dot=False, block_n=8, block_b=256, num_warps=4)
TILED = QuantizedLaunch(dot=True, block_n=32, block_b=64, num_warps=4)
INTERPRETER_BLOCK_N = 64  # few, wide programs under the interpreter


def quantized_launch(rows: int) -> QuantizedLaunch:
    launch = ONE_ROW if rows == 1 else TILED
    return dataclasses.replace(launch, block_n=INTERPRETER_BLOCK_N) if INTERPRETED else launch


def launch_skinny(out: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                  launch: QuantizedLaunch) -> None:  # fmt: skip
    """out [rows, N] = x [rows, K] (contiguous in K, K in the weight's column order) @ W.T (+ bias)."""
    rows, k = x.shape
    n = weight.shape[0]
    offsets = weight.offsets if weight.bits == 4 else weight.scales  # 8-bit: not read
    skinny_quantized_kernel[(triton.cdiv(n, launch.block_n),)](
        out, x, weight.codes, weight.scales, offsets, x if bias is None else bias, rows, n, k,
        weight.group_size, out.stride(0), x.stride(0), BITS=weight.bits, HAS_BIAS=bias is not None, DOT=launch.dot,
        UPCAST_DOT=upcast_dot(x.dtype) or x.dtype == torch.float32, BLOCK_M=MAX_ROWS if launch.dot else 1,
        BLOCK_N=launch.block_n, BLOCK_B=launch.block_b, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip


pack_int4 = pack_int8 = gemm.pack_as_is


def linear_quantized(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ W.T + bias (quant/gemm.py): skinny_quantized_kernel for up to MAX_ROWS rows."""
    rows = x.numel() // x.shape[-1]
    return gemm.linear_quantized(
        x, weight, bias, MAX_ROWS, lambda out, x2, w, b: launch_skinny(out, x2, w, b, quantized_launch(rows))
    )


linear_int4 = linear_int8 = linear_quantized
