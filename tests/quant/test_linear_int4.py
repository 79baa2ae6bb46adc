"""The 4-bit GEMM (docs/ops.md, "linear_int4") of each backend that has one, against the float64 oracle
over the weight's exact values."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import random_blocks

from xpu_coopt.backends.cpu import gemm_int4
from xpu_coopt.quant.gguf_blocks import int4_from_blocks

# Relative error (max |diff| / max |expected|) by activation dtype: 16-bit activations also round the
# scales and zeros to their dtype (gemm_int4's torch kernel).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", sorted(TOLERANCE, key=str))
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 32), (96, 576), (40, 128)])
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_linear_int4_matches_the_oracle(dtype, rows, out_features, in_features, type_name, with_bias):
    weight = int4_from_blocks(random_blocks(out_features, in_features, type_name), type_name, in_features)
    x = torch.randn(rows, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype) if with_bias else None
    out = gemm_int4.linear_int4(x, gemm_int4.pack_int4(weight, dtype), bias)
    expected = oracles.linear(x, weight.dequantize(torch.float64), bias)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    relative = (out.double() - expected).abs().max() / expected.abs().max()
    assert relative <= TOLERANCE[dtype], f"relative error {relative:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [64, 256, 512])
def test_cpu_linear_int4_takes_groups_of_any_multiple_of_32(dtype, group_size):
    """torch's kernel takes 32 to 256: larger groups (GPTQ's one group a row) are given as several equal ones."""
    from xpu_coopt.quant.rtn import quantize_int4

    weight = quantize_int4(torch.randn(48, 512), group_size)
    x = torch.randn(3, 512).to(dtype)
    out = gemm_int4.linear_int4(x, gemm_int4.pack_int4(weight, dtype))
    expected = oracles.linear(x, weight.dequantize(torch.float64))
    assert (out.double() - expected).abs().max() / expected.abs().max() <= TOLERANCE[dtype]


def test_cpu_linear_int4_names_a_group_size_it_cannot_take():
    from xpu_coopt.quant.rtn import quantize_int4

    weight = quantize_int4(torch.randn(16, 64), 16)
    with pytest.raises(
        ValueError, match=r"groups of a multiple of 32 input features for torch\.bfloat16 .* groups of 16"
    ):
        gemm_int4.pack_int4(weight, torch.bfloat16)
