"""The SYCL backend's 4-bit GEMM (docs/ops.md, "linear_int4"; sycl_kernels/linear_int4.cpp): a decode
step's few rows (up to MAX_ROWS) on the kernel, which dequantizes each weight byte's two codes in
registers; more rows (prefill) the weight dequantized once to the activation dtype and torch's GEMM."""

from __future__ import annotations

from ctypes import c_int, c_int64

import torch

from xpu_coopt.backends.sycl.kernels import SUB_GROUP, _dtype_name, _run
from xpu_coopt.quant import gemm
from xpu_coopt.quant.int4 import Int4Weight

MAX_ROWS = 16  # linear_int4.cpp kMaxRows
OUTPUTS_PER_WORK_GROUP = 4  # linear_int4.cpp kOutputsPerWorkGroup


pack_int4 = gemm.pack_as_is


def linear_int4(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T + bias (quant/gemm.py): the kernel for up to MAX_ROWS rows."""
    return gemm.linear_int4(x, weight, bias, MAX_ROWS, _launch)


def _launch(out: torch.Tensor, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> None:
    (rows, k), n = x.shape, out.shape[1]
    work_groups = -(-n // OUTPUTS_PER_WORK_GROUP)
    local = OUTPUTS_PER_WORK_GROUP * SUB_GROUP
    _run(
        x.device, "linear_int4.cpp", f"linear_int4_{_dtype_name(x)}", work_groups * local, local,
        out, x, weight.codes, weight.scales, weight.offsets, bias, c_int(rows), c_int(n), c_int(k),
        c_int(weight.group_size), c_int64(out.stride(0)), c_int64(x.stride(0)),
    )  # fmt: skip
