"""The Triton backend's 4-bit GEMM (xpu_coopt/backends/triton/linear_quantized.py) under the interpreter, against
the float64 oracle over the weight's exact values, for both launch families and the prefill hand-off."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_act_order_linear_matches_oracle, assert_linear_matches_oracle, quantized_weight

from xpu_coopt.backends.triton import linear_quantized

# Relative error (max |diff| / max |expected|): 16-bit activations meet the weight rounded to their dtype.
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}
LAUNCH_ROWS = [(linear_quantized.ONE_ROW, 1), (linear_quantized.TILED, 1), (linear_quantized.TILED, 5),
               (linear_quantized.TILED, linear_quantized.MAX_ROWS)]  # fmt: skip


def _check(out, x, weight, bias, dtype):
    assert_linear_matches_oracle(out, x, weight, bias, dtype, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", sorted(TOLERANCE, key=str))
@pytest.mark.parametrize(("launch", "rows"), LAUNCH_ROWS, ids=["elementwise-1", "dot-1", "dot-5", "dot-16"])
@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size"), [(40, 64, 32), (96, 320, 64), (24, 576, 576)]
)
@pytest.mark.parametrize("bits", [4, 8])
def test_skinny_kernel_matches_the_oracle(dtype, launch, rows, out_features, in_features, group_size, bits):
    weight = quantized_weight(bits, out_features, in_features, group_size)
    x = torch.randn(rows, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    out = x.new_empty(rows, out_features)
    launch = dataclasses.replace(launch, block_n=16, block_b=32)  # several programs and K steps, a ragged end
    linear_quantized.launch_skinny(out, x, weight, bias, launch)
    _check(out, x, weight, bias, dtype)


@pytest.mark.parametrize("rows", [1, 3, linear_quantized.MAX_ROWS + 1])
def test_linear_int4_reads_inputs_in_act_order_and_hands_prefill_to_torch(rows):
    assert_act_order_linear_matches_oracle(linear_quantized, rows)
