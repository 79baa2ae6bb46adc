"""The SYCL backend's 4-bit GEMM (docs/ops.md, "linear_int4"; sycl_kernels/linear_int4.cpp): a decode
step's few rows (up to MAX_ROWS) on the kernel, which dequantizes each weight byte's two codes in
registers; more rows (prefill) the weight dequantized once to the activation dtype and torch's GEMM."""

from __future__ import annotations

from ctypes import c_int, c_int64

import torch
import torch.nn.functional as F

from xpu_coopt.backends.sycl.kernels import SUB_GROUP, _dtype_name, _run
from xpu_coopt.quant.int4 import Int4Weight

MAX_ROWS = 16  # linear_int4.cpp kMaxRows
OUTPUTS_PER_WORK_GROUP = 4  # linear_int4.cpp kOutputsPerWorkGroup


def pack_int4(weight: Int4Weight, dtype: torch.dtype) -> Int4Weight:
    """The kernel reads an Int4Weight as it is (contiguous)."""
    del dtype
    return Int4Weight(
        weight.codes.contiguous(), weight.scales.contiguous(), weight.offsets.contiguous(), weight.group_size,
        weight.input_order,
    )  # fmt: skip


def linear_int4(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T + bias."""
    rows = x.numel() // x.shape[-1]
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear_int4: input of {x.shape[-1]} features for a 4-bit weight of shape {(n, k)}")
    if rows > MAX_ROWS or rows == 0:
        return F.linear(x, weight.dequantize(x.dtype), bias)
    x2 = x.reshape(rows, k)
    if weight.input_order is not None:
        x2 = x2.index_select(1, weight.input_order)
    x2 = x2.contiguous()
    out = x.new_empty((rows, n))
    work_groups = -(-n // OUTPUTS_PER_WORK_GROUP)
    local = OUTPUTS_PER_WORK_GROUP * SUB_GROUP
    _run(
        x.device, "linear_int4.cpp", f"linear_int4_{_dtype_name(x)}", work_groups * local, local,
        out, x2, weight.codes, weight.scales, weight.offsets, bias, c_int(rows), c_int(n), c_int(k),
        c_int(weight.group_size), c_int64(out.stride(0)), c_int64(x2.stride(0)),
    )  # fmt: skip
    return out.view(*x.shape[:-1], n)
