"""x @ weight.T (+ bias) for the few activation rows of a decode step, in Triton.

With a few rows a GEMM is a weight read: every byte of the [N, K] matrix once. Each program owns BLOCK_N
output columns for all rows and walks the whole K dimension, so no split-K partial sums need a second
kernel (cuBLAS splits some of these shapes and adds a reduce kernel); the loop's loads are
software-pipelined (num_stages) to keep enough bytes in flight. Rows are padded to a 16-row tile for
tl.dot (tensor cores; the padding costs nothing when memory bound), or, for one row, multiplied
elementwise and reduced once after the loop (DOT=False). float32 blocks are multiplied in full precision
(input_precision="ieee": tl.dot would round them to TF32), as are bfloat16 ones under the interpreter,
whose bfloat16 tl.dot is wrong. Many rows (prefill, large batches) are compute-bound GEMMs: torch's
(cuBLAS) run them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from xpu_coopt.ops import checks
from xpu_coopt.triton.kernels import BACKEND, INTERPRETED, upcast_dot

OP = "linear"
MAX_ROWS = 16  # one tl.dot tile of rows; more rows run torch's GEMM


@triton.jit
def skinny_linear_kernel(out, x, weight, bias, rows, N, K, out_stride, x_stride, weight_stride,
                         HAS_BIAS: tl.constexpr, DOT: tl.constexpr, EVEN_K: tl.constexpr,
                         UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):  # fmt: skip
    columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ids = tl.arange(0, BLOCK_M)
    in_n = columns < N
    in_rows = row_ids < rows
    depth = tl.arange(0, BLOCK_K)
    w_rows = weight + columns.to(tl.int64)[:, None] * weight_stride
    x_rows = x + row_ids.to(tl.int64)[:, None] * x_stride
    # One row without tl.dot: products summed over K once, after the loop.
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) if DOT else tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + depth
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=in_n[:, None], other=0.0)
            a = tl.load(x_rows + k[None, :], mask=in_rows[:, None], other=0.0)
        else:
            w = tl.load(w_rows + k[None, :], mask=in_n[:, None] & (k[None, :] < K), other=0.0)
            a = tl.load(x_rows + k[None, :], mask=in_rows[:, None] & (k[None, :] < K), other=0.0)
        if DOT:
            if UPCAST_DOT:
                acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        else:
            acc += w.to(tl.float32) * a.to(tl.float32)
    result = acc if DOT else tl.sum(acc, axis=1)[None, :]
    if HAS_BIAS:
        result += tl.load(bias + columns, mask=in_n, other=0.0).to(tl.float32)[None, :]
    out_pointers = out + row_ids.to(tl.int64)[:, None] * out_stride + columns[None, :]
    tl.store(out_pointers, result.to(out.dtype.element_ty), mask=in_rows[:, None] & in_n[None, :])


@dataclasses.dataclass(frozen=True)
class SkinnyLaunch:
    """One launch configuration of skinny_linear_kernel."""

    dot: bool
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


# On an H100 (scripts/bench_linear.py, docs/benchmarks.md). One row: elementwise in long K blocks over
# few columns a program, whose many programs leave short wave tails on any N; over the projections of
# llama-2-7b, llama-3-8b and llama-2-13b a step's GEMMs take within 0.8% of the fastest of the launches
# tried for each model. Several rows: through tl.dot, within 4% of a 36-launch grid on llama-2-7b.
ONE_ROW = SkinnyLaunch(dot=False, block_n=4, block_k=1024, num_warps=8, num_stages=3)
TILED = SkinnyLaunch(dot=True, block_n=32, block_k=256, num_stages=5)


# Under the interpreter every program costs milliseconds of Python, so the wrapper launches a few wide
# ones there (tests/test_triton_linear.py runs ONE_ROW and TILED themselves).
INTERPRETER_BLOCK_N = 64


def skinny_launch(rows: int) -> SkinnyLaunch:
    launch = ONE_ROW if rows == 1 else TILED
    return dataclasses.replace(launch, block_n=INTERPRETER_BLOCK_N) if INTERPRETED else launch


def launch_skinny_linear(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    launch: SkinnyLaunch,
    upcast: bool = False,
) -> None:
    """out[rows, N] = x[rows, K] @ weight[N, K].T (+ bias); 2-D tensors, contiguous in their last dimension."""
    rows, k = x.shape
    n = weight.shape[0]
    skinny_linear_kernel[(triton.cdiv(n, launch.block_n),)](
        out, x, weight, x if bias is None else bias, rows, n, k, out.stride(0), x.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, DOT=launch.dot, EVEN_K=k % launch.block_k == 0,
        UPCAST_DOT=upcast or x.dtype == torch.float32, BLOCK_M=MAX_ROWS if launch.dot else 1,
        BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias: skinny_linear_kernel for up to MAX_ROWS rows, torch's GEMM for more."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows > MAX_ROWS or rows == 0:
        return F.linear(x, weight, bias)
    checks.activation_dtype(OP, BACKEND, x, weight, *(() if bias is None else (bias,)))
    checks.inner_contiguous(OP, weight=weight, bias=bias)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{OP}: input of {x.shape[-1]} features for a weight of shape {tuple(weight.shape)}")
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = x.new_empty((rows, weight.shape[0]))
    launch_skinny_linear(out, x2, weight, bias, skinny_launch(rows), upcast_dot(x.dtype))
    return out.view(*x.shape[:-1], weight.shape[0])
