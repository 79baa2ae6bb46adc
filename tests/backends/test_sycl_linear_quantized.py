"""The SYCL backend's 4-bit GEMM (sycl_kernels/linear_quantized.cpp) on the OpenCL CPU device, against the
float64 oracle over the weight's exact values; end to end it runs in tests/quant/test_int4_models.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_act_order_linear_matches_oracle, assert_linear_matches_oracle, quantized_weight

from xpu_coopt.backends.sycl import linear_quantized

# Relative error (max |diff| / max |expected|) by activation dtype (accumulated in float32).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _check(out, x, weight, bias, dtype):
    assert_linear_matches_oracle(out, x, weight, bias, dtype, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", sorted(TOLERANCE, key=str))
@pytest.mark.parametrize("rows", [1, 5, linear_quantized.MAX_ROWS])
@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size"), [(40, 64, 32), (7, 320, 64), (24, 576, 576)]
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_sycl_linear_quantized_matches_the_oracle(
    dtype, rows, out_features, in_features, group_size, with_bias, bits
):
    weight = linear_quantized.pack_int4(quantized_weight(bits, out_features, in_features, group_size), dtype)
    x = torch.randn(rows, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype) if with_bias else None
    _check(linear_quantized.linear_quantized(x, weight, bias), x, weight, bias, dtype)


@pytest.mark.parametrize("rows", [2, linear_quantized.MAX_ROWS + 1])
def test_sycl_linear_int4_reads_act_order_inputs_and_hands_prefill_to_torch(rows):
    assert_act_order_linear_matches_oracle(linear_quantized, rows)
