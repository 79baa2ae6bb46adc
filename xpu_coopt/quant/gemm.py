"""What the device backends' 4- and 8-bit GEMMs (Triton, SYCL) do around their kernels (docs/ops.md,
"linear_int4", "linear_int8"): a decode step's few rows go to the kernel, in the weight's column order;
more rows (prefill, compute-bound) dequantize the weight once to the activations' dtype for torch's GEMM."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from xpu_coopt.quant.quantized_linear import QuantizedWeight

# launch(out [rows, N], x [rows, K] contiguous in the weight's column order, weight, bias)
Launch = Callable[[torch.Tensor, torch.Tensor, QuantizedWeight, torch.Tensor | None], None]


def pack_as_is(weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    """pack_int4 / pack_int8 for kernels that read the weight as it is: its tensors contiguous."""
    del dtype
    return weight.contiguous()


def linear_quantized(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, max_rows: int, launch: Launch
) -> torch.Tensor:
    """x [..., K] @ W.T + bias: `launch` for up to max_rows rows, torch's GEMM over the dequantized weight
    for more."""
    rows = x.numel() // x.shape[-1]
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"linear_int{weight.bits}: input of {x.shape[-1]} features for a {weight.bits}-bit weight of "
            f"shape {(n, k)}"
        )
    if rows > max_rows or rows == 0:
        return F.linear(x, weight.dequantize(x.dtype), bias)
    x2 = x.reshape(rows, k)
    if weight.input_order is not None:
        x2 = x2.index_select(1, weight.input_order)
    out = x.new_empty((rows, n))
    launch(out, x2.contiguous(), weight, bias)
    return out.view(*x.shape[:-1], n)
