"""The Triton backend's few-row GEMM (xpu_coopt/triton/linear.py) under the interpreter, against F.linear
in float64, for both of its launch families and the hand-off to torch's GEMM beyond MAX_ROWS."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from xpu_coopt import backends
from xpu_coopt.triton import linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _expected(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


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
    assert backends.resolve_backend("triton", torch.device("cpu")).linear is linear.linear
    assert backends.resolve_backend("torch", torch.device("cpu")).linear is not linear.linear
