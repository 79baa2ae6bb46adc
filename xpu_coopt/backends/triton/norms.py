"""rms_norm, fused_add_rms_norm and silu_and_mul in Triton: one program per row (the norms) or per block
of a row (silu_and_mul). Rounding follows the reference: normalise in float32, round to the activation
dtype, then multiply by the weight in that dtype."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def inverse_rms(sum_of_squares, hidden, epsilon):
    """1 / RMS of rows of `hidden` values from their sums of squares (also the fused GEMMs' norm)."""
    return 1.0 / tl.sqrt(sum_of_squares / hidden + epsilon)


@triton.jit
def _normalize(x, weight_pointer, columns, mask, hidden, epsilon, DTYPE: tl.constexpr):
    """x: one float32 row -> rms_norm(x) * weight, in DTYPE."""
    inverse_rms_of_x = inverse_rms(tl.sum(x * x, axis=0), hidden, epsilon)
    weight = tl.load(weight_pointer + columns, mask=mask, other=0.0).to(tl.float32)
    return (weight * (x * inverse_rms_of_x).to(DTYPE).to(tl.float32)).to(DTYPE)


@triton.jit
def rms_norm_kernel(out, input, weight, epsilon, hidden, out_stride, in_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    mask = columns < hidden
    x = tl.load(input + row * in_stride + columns, mask=mask, other=0.0)
    tl.store(
        out + row * out_stride + columns,
        _normalize(x.to(tl.float32), weight, columns, mask, hidden, epsilon, x.dtype),
        mask=mask,
    )


@triton.jit
def fused_add_rms_norm_kernel(input, residual, weight, epsilon, hidden, in_stride, residual_stride,
                              BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    mask = columns < hidden
    x = tl.load(input + row * in_stride + columns, mask=mask, other=0.0)
    r = tl.load(residual + row * residual_stride + columns, mask=mask, other=0.0)
    total = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)  # residual += input, rounded to the dtype
    tl.store(residual + row * residual_stride + columns, total, mask=mask)
    normalized = _normalize(total.to(tl.float32), weight, columns, mask, hidden, epsilon, x.dtype)
    tl.store(input + row * in_stride + columns, normalized, mask=mask)


@triton.jit
def silu_and_mul_kernel(out, input, width, out_stride, in_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < width
    gate = tl.load(input + row * in_stride + columns, mask=mask, other=0.0)
    up = tl.load(input + row * in_stride + width + columns, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out + row * out_stride + columns, (silu * up).to(gate.dtype), mask=mask)
