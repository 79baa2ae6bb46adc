"""The CPU backend's GEMM choices give the same numbers as F.linear, whatever the kernel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from xpu_coopt.backends.cpu import gemm as cpu_gemm


@pytest.mark.parametrize("cpu_has_bfloat16_gemms", [True, False], ids=["onednn-bf16", "no-onednn-bf16"])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_f_linear_for_plain_and_packed_weights(
    monkeypatch, rows, with_bias, dtype, cpu_has_bfloat16_gemms
):
    """Whatever the CPU: from FLOAT32_MIN_ROWS rows on a CPU without oneDNN's bfloat16 GEMMs the plain
    weights run in float32."""
    if cpu_has_bfloat16_gemms and cpu_gemm.why_not_packable(torch.device("cpu"), torch.bfloat16):
        pytest.skip("oneDNN has no bfloat16 GEMMs on this CPU: its packed weights cannot run here")
    monkeypatch.setattr(cpu_gemm, "_cpu_has_bfloat16_gemms", lambda: cpu_has_bfloat16_gemms)
    parts = tuple(torch.randn(n, 96, dtype=dtype) for n in (64, 32, 32))
    fused = torch.cat(parts)
    bias = torch.randn(128, dtype=dtype) if with_bias else None
    x = torch.randn(rows, 96, dtype=dtype)
    expected = F.linear(x.float(), fused.float(), None if bias is None else bias.float())
    for weight in (fused, cpu_gemm.pack_weight(fused, parts), cpu_gemm.pack_weight(fused)):
        got = cpu_gemm.linear(x, weight, bias)
        assert got.shape == (rows, 128) and got.dtype == dtype
        torch.testing.assert_close(
            got.float(), expected, atol=3e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2
        )


def test_only_bfloat16_cpu_weights_are_packed():
    weight = torch.randn(8, 8)
    assert cpu_gemm.pack_weight(weight) is weight
    packed = cpu_gemm.pack_weight(weight.bfloat16())
    cpu_packs = cpu_gemm.why_not_packable(torch.device("cpu"), torch.bfloat16) is None
    assert isinstance(packed, cpu_gemm.PackedWeight) == cpu_packs


def test_a_cpu_without_bfloat16_gemms_keeps_its_weights_plain(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_cpu_has_bfloat16_gemms", lambda: False)
    weight = torch.randn(8, 8, dtype=torch.bfloat16)
    assert cpu_gemm.pack_weight(weight) is weight
    reason = cpu_gemm.why_not_packable(torch.device("cpu"), torch.bfloat16)
    assert reason is not None and "no bfloat16 GEMMs on this CPU" in reason


def test_16_bit_matmuls_run_in_float32_only_where_the_cpu_lacks_their_kernels(monkeypatch):
    cpu = torch.device("cpu")
    assert cpu_gemm.matmul_dtype(cpu, torch.float32) == torch.float32
    assert cpu_gemm.matmul_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(cpu_gemm, "_cpu_has_bfloat16_gemms", lambda: False)
    assert cpu_gemm.matmul_dtype(cpu, torch.bfloat16) == torch.float32
    monkeypatch.setattr(cpu_gemm, "_cpu_has_bfloat16_gemms", lambda: True)
    assert cpu_gemm.matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_shape", [(16, 96), (2, 9, 96)])
def test_float32_gemms_convert_large_weights_in_slices(monkeypatch, with_bias, x_shape):
    """On a CPU without oneDNN's bfloat16 GEMMs, a weight larger than CONVERTED_SLICE_BYTES in float32 is
    converted and multiplied a slice of output features at a time (here 40, 40, 40 and 8 of 128)."""
    monkeypatch.setattr(cpu_gemm, "_cpu_has_bfloat16_gemms", lambda: False)
    monkeypatch.setattr(cpu_gemm, "CONVERTED_SLICE_BYTES", 40 * 96 * 4)
    slices = []
    monkeypatch.setattr(
        cpu_gemm, "F", SimpleNamespace(linear=lambda x, w, b: slices.append(w.shape[0]) or F.linear(x, w, b))
    )
    weight = torch.randn(128, 96, dtype=torch.bfloat16)
    bias = torch.randn(128, dtype=torch.bfloat16) if with_bias else None
    x = torch.randn(x_shape, dtype=torch.bfloat16)
    got = cpu_gemm.linear(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    assert got.shape == (*x_shape[:-1], 128) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=1e-2)
    assert slices == [40, 40, 40, 8]
