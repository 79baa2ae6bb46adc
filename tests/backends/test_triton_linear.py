"""The Triton backend's few-row GEMM (xpu_coopt/backends/triton/linear.py) under the interpreter, against F.linear
in float64, for both of its launch families and the hand-off to torch's GEMM beyond MAX_ROWS; and its
fusions (RMSNorm before, SiLU * up or a residual add after) against the same ops composed in float64."""

from __future__ import annotations

import dataclasses

import oracles
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from xpu_coopt import backends
from xpu_coopt.backends.triton import linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _expected(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def _expected_norm_linear(x, norm_weight, eps, weight, bias, gated):
    product = _expected(oracles.rms_norm(x, norm_weight, eps), weight, bias)
    return oracles.silu_and_mul(product) if gated else product


# The elementwise launch serves one row; tl.dot's any number up to MAX_ROWS.
LAUNCH_ROWS = [
    (linear.ONE_ROW, 1),
    (linear.TILED, 1),
    (linear.TILED, 3),
    (linear.TILED, linear.MAX_ROWS),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("launch", "rows"), LAUNCH_ROWS, ids=["elementwise-1", "dot-1", "dot-3", "dot-16"])
@pytest.mark.parametrize(("n", "k"), [(40, 96), (64, 512), (33, 600)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_matches_f_linear(dtype, launch, rows, n, k, with_bias):
    torch.manual_seed(rows * n + k)
    x = torch.randn(rows, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    out = torch.empty(rows, n, dtype=dtype)
    linear.launch_skinny_linear(out, x, weight, bias, launch, upcast=dtype == torch.bfloat16)
    assert_close(out, _expected(x, weight, bias), dtype, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (2, 1, 96), (4, 2, 96), (linear.MAX_ROWS + 1, 96)])
def test_linear_keeps_leading_dimensions_and_hands_many_rows_to_torch(dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    weight = torch.randn(70, 96, dtype=dtype) / 96**0.5
    out = linear.linear(x, weight)
    assert out.shape == (*shape[:-1], 70) and out.dtype == dtype
    assert_close(out, _expected(x, weight, None), dtype, scale=4.0)


def test_linear_reads_strided_rows_and_column_slices_of_weights():
    x = torch.randn(3, 200, dtype=torch.float16)[:, :96]  # rows 200 apart
    weight = torch.randn(50, 128, dtype=torch.float16)[:, 16:112]  # rows 128 apart
    assert_close(linear.linear(x, weight), _expected(x, weight, None), torch.float16, scale=4.0)


def test_linear_bad_input_names_the_problem():
    x = torch.randn(2, 16, dtype=torch.float16)
    with pytest.raises(TypeError, match="linear: all activations must share one dtype"):
        linear.linear(x, torch.randn(8, 16))
    with pytest.raises(ValueError, match="linear: input of 16 features for a weight of shape \\(8, 12\\)"):
        linear.linear(x, torch.randn(8, 12, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight must be contiguous in its last dimension"):
        linear.linear(x, torch.randn(16, 8, dtype=torch.float16).t())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        linear.linear(x.double(), torch.randn(8, 16, dtype=torch.float64))


def test_skinny_launch_runs_one_row_elementwise_and_more_through_tl_dot():
    one, several = linear.skinny_launch(1), linear.skinny_launch(linear.MAX_ROWS)
    assert linear.skinny_launch(2) == several
    # Under the interpreter the same launches with wider column blocks (fewer programs to interpret).
    assert one == dataclasses.replace(linear.ONE_ROW, block_n=linear.INTERPRETER_BLOCK_N)
    assert several == dataclasses.replace(linear.TILED, block_n=linear.INTERPRETER_BLOCK_N)
    assert not one.dot and several.dot


def test_triton_backend_runs_its_gemm_and_the_reference_backend_torchs():
    triton = backends.resolve_backend("triton", torch.device("cpu"))
    assert triton.linear is linear.linear and triton.fusions is linear.FUSIONS
    reference = backends.resolve_backend("torch", torch.device("cpu"))
    assert reference.linear is not linear.linear and reference.fusions is None
    # Eager decode on a GPU (cuda_graph=False) asks for torch's GEMMs: unfused, the same kernels otherwise.
    eager = triton.with_torch_gemms()
    assert eager.linear is F.linear and eager.fusions is None and eager.kernels is triton.kernels


# Fused launches over odd widths (masked columns), K beyond one block and not a multiple of it, with and
# without a bias; rows as a decode step has them (one elementwise, several through tl.dot).
FUSED_SHAPES = [(40, 96), (33, 1100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("launch", "rows"), LAUNCH_ROWS, ids=["elementwise-1", "dot-1", "dot-3", "dot-16"])
@pytest.mark.parametrize(("n", "k"), FUSED_SHAPES)
@pytest.mark.parametrize("gated", [False, True])
def test_norm_linear_matches_rms_norm_then_linear(dtype, launch, rows, n, k, gated):
    torch.manual_seed(rows + n + k)
    x = torch.randn(rows, k, dtype=dtype) * 3  # away from unit RMS, so a missing norm shows
    norm_weight = torch.rand(k, dtype=dtype) + 0.5
    weight = torch.randn(2 * n if gated else n, k, dtype=dtype) / k**0.5
    bias = torch.randn(weight.shape[0], dtype=dtype) if n % 2 else None
    out = torch.empty(rows, n, dtype=dtype)
    linear.launch_skinny_linear(
        out, x, weight, bias, launch, dtype == torch.bfloat16, (norm_weight, 1e-5), gated=gated
    )
    assert_close(out, _expected_norm_linear(x, norm_weight, 1e-5, weight, bias, gated), dtype, scale=4.0)


@pytest.mark.parametrize(("launch", "rows"), LAUNCH_ROWS, ids=["elementwise-1", "dot-1", "dot-3", "dot-16"])
def test_norm_linear_takes_rows_whose_product_with_the_norm_weight_overflows_float16(launch, rows):
    """A residual stream's outliers (thousands) times a large norm weight pass float16's 65504; only
    rms_norm's output (|x| / rms <= sqrt(K) times the weight) must stay in range, as in the unfused ops."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 256, dtype=torch.float16)
    x[:, 7] = 3000.0
    norm_weight = torch.full((256,), 30.0, dtype=torch.float16)
    weight = torch.randn(40, 256, dtype=torch.float16) / 256**0.5
    out = torch.empty(rows, 40, dtype=torch.float16)
    linear.launch_skinny_linear(out, x, weight, None, launch, False, (norm_weight, 1e-5))
    expected = _expected_norm_linear(x, norm_weight, 1e-5, weight, None, False)
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float16, scale=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("launch", "rows"), LAUNCH_ROWS, ids=["elementwise-1", "dot-1", "dot-3", "dot-16"])
@pytest.mark.parametrize(("n", "k"), FUSED_SHAPES)
def test_accumulating_linear_adds_into_its_output(dtype, launch, rows, n, k):
    torch.manual_seed(rows * n + k)
    x = torch.randn(rows, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    bias = torch.randn(n, dtype=dtype) if n % 2 else None
    residual = torch.randn(rows, n, dtype=dtype) * 4
    expected = residual.double() + _expected(x, weight, bias)
    linear.launch_skinny_linear(residual, x, weight, bias, launch, dtype == torch.bfloat16, accumulate=True)
    assert_close(residual, expected, dtype, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("leading", [(1,), (2, 1), (linear.MAX_ROWS,)])
def test_fusion_wrappers_keep_leading_dimensions(dtype, leading):
    torch.manual_seed(len(leading))
    x = torch.randn(*leading, 96, dtype=dtype)
    norm_weight = torch.rand(96, dtype=dtype) + 0.5
    gate_up = torch.randn(2 * 36, 96, dtype=dtype) / 96**0.5
    out = linear.norm_linear(x, norm_weight, 1e-6, gate_up, None, gated=True)
    assert out.shape == (*leading, 36) and out.dtype == dtype
    assert_close(out, _expected_norm_linear(x, norm_weight, 1e-6, gate_up, None, True), dtype, scale=4.0)
    down = torch.randn(96, 36, dtype=dtype) / 36**0.5
    residual = torch.randn(*leading, 96, dtype=dtype)
    expected = residual.double() + _expected(out, down, None)
    assert linear.linear_add_(out, down, None, residual) is residual
    assert_close(residual, expected, dtype, scale=4.0)


def test_fused_gemms_read_strided_rows():
    """The LM head's input at prefill: the last position of each prompt, rows a prompt apart."""
    hidden = torch.randn(3, 5, 64, dtype=torch.float16)[:, -1]
    norm_weight, weight = torch.rand(64, dtype=torch.float16) + 0.5, torch.randn(40, 64, dtype=torch.float16)
    expected = _expected_norm_linear(hidden, norm_weight, 1e-5, weight, None, False)
    assert_close(linear.norm_linear(hidden, norm_weight, 1e-5, weight), expected, torch.float16, scale=4.0)


def test_fusions_bad_input_names_the_problem():
    x, weight = torch.randn(2, 16, dtype=torch.float16), torch.randn(8, 16, dtype=torch.float16)
    norm_weight = torch.ones(16, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"linear: the fused GEMMs take 1 to {linear.MAX_ROWS} rows, got 17"):
        linear.norm_linear(torch.randn(17, 16, dtype=torch.float16), norm_weight, 1e-5, weight)
    with pytest.raises(ValueError, match="linear: norm weight of shape \\(12,\\) for 16 features"):
        linear.norm_linear(x, norm_weight[:12], 1e-5, weight)
    with pytest.raises(TypeError, match="linear: all activations must share one dtype"):
        linear.norm_linear(x, norm_weight.float(), 1e-5, weight)
    with pytest.raises(
        ValueError, match=r"a gated GEMM needs an even number of weight rows \(gate, then up\), got 7"
    ):
        linear.norm_linear(x, norm_weight, 1e-5, weight[:7], gated=True)
    with pytest.raises(ValueError, match="linear: residual of shape \\(2, 4\\) for an output of \\(2, 8\\)"):
        linear.linear_add_(x, weight, None, torch.zeros(2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="linear: residual must be viewable as \\[rows, 8\\]"):
        rows_apart = torch.zeros(2, 3, 8, dtype=torch.float16)[:, :2]  # [2, 2, 8], rows not evenly apart
        linear.linear_add_(x.expand(2, 2, 16), weight, None, rows_apart)
