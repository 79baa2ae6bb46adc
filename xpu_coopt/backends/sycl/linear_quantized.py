"""The SYCL backend's 4- and 8-bit GEMMs (docs/ops.md, "linear_int4", "linear_int8";
sycl_kernels/linear_quantized.cpp): a decode step's few rows (up to MAX_ROWS) on the kernel, which
dequantizes each pair of codes in registers; more rows (prefill) the weight dequantized once to the
activation dtype and torch's GEMM."""

from __future__ import annotations

from ctypes import c_int, c_int64

import torch

from xpu_coopt.backends.sycl.kernels import SUB_GROUP, _dtype_name, _run
from xpu_coopt.quant import gemm
from xpu_coopt.quant.quantized_linear import QuantizedWeight

MAX_ROWS = 16  # linear_quantized.cpp kMaxRows
OUTPUTS_PER_WORK_GROUP = 4  # linear_quantized.cpp kOutputsPerWorkGroup


pack_int4 = pack_int8 = gemm.pack_as_is


def linear_quantized(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ W.T + bias (quant/gemm.py): the kernel for up to MAX_ROWS rows."""
    return gemm.linear_quantized(x, weight, bias, MAX_ROWS, _launch)


linear_int4 = linear_int8 = linear_quantized


def _launch(out: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
    (rows, k), n = x.shape, out.shape[1]
    work_groups = -(-n // OUTPUTS_PER_WORK_GROUP)
    local = OUTPUTS_PER_WORK_GROUP * SUB_GROUP
    offsets = weight.offsets if weight.bits == 4 else None
    _run(
        x.device, "linear_quantized.cpp", f"linear_int{weight.bits}_{_dtype_name(x)}", work_groups * local,
        local, out, x, weight.codes, weight.scales, offsets, bias, c_int(rows), c_int(n), c_int(k),
        c_int(weight.group_size), c_int64(out.stride(0)), c_int64(x.stride(0)),
    )  # fmt: skip
