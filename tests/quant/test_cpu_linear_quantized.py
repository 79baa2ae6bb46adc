"""The CPU backend's 4- and 8-bit GEMMs (docs/ops.md, "linear_int4", "linear_int8"), against the float64
oracle over the weight's exact values."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import quantized_weight, random_blocks, random_int8_blocks

from xpu_coopt.backends.cpu import gemm_int4, gemm_int8, native
from xpu_coopt.quant.gguf_blocks import int4_from_blocks, quantized_from_blocks
from xpu_coopt.quant.int8 import Int8Weight

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


# (kind, in_features, packing with the native kernels, packing without them)
INT8_CASES = [
    ("Q8_0", 64, gemm_int8.NativeInt8, gemm_int8.SplitInt8),
    ("Q8_0", 576, gemm_int8.NativeInt8, gemm_int8.SplitInt8),
    ("Q6_K", 512, gemm_int8.NativeInt8, Int8Weight),
    ("per-channel", 576, gemm_int8.PerChannelInt8, gemm_int8.PerChannelInt8),
    ("groups of 64", 128, gemm_int8.NativeInt8, gemm_int8.SplitInt8),
]


@pytest.mark.parametrize("dtype", sorted(TOLERANCE, key=str))
@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize(("kind", "in_features", "native_packing", "torch_packing"), INT8_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_native", [True, False], ids=["native", "torch"])
def test_cpu_linear_int8_matches_the_oracle(
    monkeypatch, dtype, rows, kind, in_features, native_packing, torch_packing, with_bias, with_native
):
    """Each packing of an 8-bit weight (per channel: torch's int8 kernel; grouped: the native kernel up to
    16 rows, torch's GEMM over parts dequantized in turn past that; without the native kernels, groups of
    a multiple of 32 as two 4-bit halves; others and float32: dequantized each call)."""
    if with_native and native.library() is None:
        pytest.fail(f"the native CPU kernels could not be built here: {native._unavailable}")
    if not with_native:
        monkeypatch.setattr(native, "_library", None)
        monkeypatch.setattr(native, "_unavailable", "compared")
    monkeypatch.setattr(gemm_int8, "NATIVE_CHUNK_ROWS", 16)  # 40 features: three parts
    out_features = 40
    if kind.startswith("Q"):
        raw = random_int8_blocks(out_features, in_features, kind)
        weight = quantized_from_blocks(raw, kind, in_features)
    else:
        weight = quantized_weight(8, out_features, in_features, in_features if kind == "per-channel" else 64)
    packed = gemm_int8.pack_int8(weight, dtype)
    expected_packing = native_packing if with_native else torch_packing
    assert isinstance(packed, Int8Weight if dtype == torch.float32 else expected_packing)
    x = (
        torch.randn(rows, 2 * in_features).to(dtype)[:, ::2]
        if rows == 5
        else torch.randn(rows, in_features).to(dtype)
    )
    bias = torch.randn(out_features).to(dtype) if with_bias else None
    out = gemm_int8.linear_int8(x, packed, bias)
    expected = oracles.linear(x, weight.dequantize(torch.float64), bias)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    relative = (out.double() - expected).abs().max() / expected.abs().max()
    assert relative <= TOLERANCE[dtype], f"relative error {relative:.2e}"


def test_cpu_int4_packing_in_chunks_of_rows_gives_the_same_bytes(monkeypatch):
    """pack_int4 converts PACK_ROWS rows at a time (a bounded int32 transient): the same bytes as at once,
    for a row count that is not a multiple of the chunk nor of 16."""
    from xpu_coopt.quant.rtn import quantize_int4

    weight = quantize_int4(torch.randn(200, 256), 64)
    whole = gemm_int4.pack_int4(weight, torch.bfloat16)
    monkeypatch.setattr(gemm_int4, "PACK_ROWS", 64)
    chunked = gemm_int4.pack_int4(weight, torch.bfloat16)
    assert torch.equal(chunked.packed, whole.packed) and torch.equal(
        chunked.scales_and_zeros, whole.scales_and_zeros
    )
