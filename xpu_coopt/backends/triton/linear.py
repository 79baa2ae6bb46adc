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

from xpu_coopt.backends.triton.kernels import BACKEND, INTERPRETED, upcast_dot
from xpu_coopt.backends.triton.norms import inverse_rms as rows_inverse_rms
from xpu_coopt.ops import GemmFusions, checks

OP = "linear"
MAX_ROWS = 16  # one tl.dot tile of rows; more rows run torch's GEMM


@triton.jit
def _load_k_block(pointers, k, K, mask, EVEN_K: tl.constexpr):
    """pointers [R, 1] + k: one K block of R rows; mask [R, 1] selects the rows."""
    if EVEN_K:
        block = tl.load(pointers + k[None, :], mask=mask, other=0.0)
    else:
        block = tl.load(pointers + k[None, :], mask=mask & (k[None, :] < K), other=0.0)
    return block


@triton.jit
def _product(a, w, acc, DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ w.T through tl.dot, or (one row, DOT=False) acc + w * a elementwise, summed after the loop."""
    # (one return at the end: the compiler does not take a return under a constexpr `if` as final)
    if DOT:
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(w.dtype), tl.trans(w), acc)
    else:
        acc += w.to(tl.float32) * a.to(tl.float32)
    return acc


@triton.jit
def _output_columns(acc, inverse_rms, bias, columns, in_n, SCALE: tl.constexpr, DOT: tl.constexpr,
                    HAS_BIAS: tl.constexpr):  # fmt: skip
    """The loop's products as [rows, BLOCK_N] output columns: scaled by each row's inverse RMS (SCALE),
    plus the bias."""
    result = acc if DOT else tl.sum(acc, axis=1)[None, :]
    if SCALE:
        result = result * inverse_rms[:, None]
    if HAS_BIAS:
        result += tl.load(bias + columns, mask=in_n, other=0.0).to(tl.float32)[None, :]
    return result


@triton.jit
def skinny_linear_kernel(out, x, weight, bias, norm_weight, rows, N, K, epsilon, out_stride, x_stride,
                         weight_stride, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
                         ACCUMULATE: tl.constexpr, DOT: tl.constexpr, EVEN_K: tl.constexpr,
                         UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):  # fmt: skip
    """out[:, :N] = x @ weight.T (+ bias), with a decoder layer's fusions (docs/ops.md, "linear"). NORM: of
    rms_norm(x) * norm_weight. GATED: weight holds 2N rows; out = silu(gate) * up of its two halves.
    ACCUMULATE: out += the result (a residual add)."""
    columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ids = tl.arange(0, BLOCK_M)
    in_n = columns < N
    in_rows = row_ids < rows
    depth = tl.arange(0, BLOCK_K)
    w_rows = weight + columns.to(tl.int64)[:, None] * weight_stride
    up_rows = w_rows + N.to(tl.int64) * weight_stride  # GATED: the up half's rows follow the gate half's
    x_rows = x + row_ids.to(tl.int64)[:, None] * x_stride
    # One row without tl.dot: products summed over K once, after the loop.
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) if DOT else tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    up_acc = tl.zeros_like(acc)
    # NORM, one row: the sum of squares gathered in the pass over x, the RMS scale (a factor of the whole
    # row) applied to the finished products, so the weight loads never wait for a reduction. Through
    # tl.dot, x goes in the activation dtype, where x * norm_weight unnormalised could overflow float16:
    # a first pass over x (a few rows, from L2) finds the scale, and the loop feeds rms_norm's output.
    inverse_rms = tl.zeros((BLOCK_M,), tl.float32)
    squares = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    if NORM and DOT:
        row_squares = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a32 = _load_k_block(x_rows, k0 + depth, K, in_rows[:, None], EVEN_K).to(tl.float32)
            row_squares += tl.sum(a32 * a32, axis=1)
        inverse_rms = rows_inverse_rms(row_squares, K, epsilon)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + depth
        w = _load_k_block(w_rows, k, K, in_n[:, None], EVEN_K)
        a = _load_k_block(x_rows, k, K, in_rows[:, None], EVEN_K)
        if NORM:
            a32 = a.to(tl.float32)
            if EVEN_K:
                g = tl.load(norm_weight + k).to(tl.float32)[None, :]
            else:
                g = tl.load(norm_weight + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
            if DOT:
                a = a32 * inverse_rms[:, None] * g
            else:
                squares += a32 * a32
                a = a32 * g
        acc = _product(a, w, acc, DOT, UPCAST_DOT)
        if GATED:
            up_acc = _product(a, _load_k_block(up_rows, k, K, in_n[:, None], EVEN_K), up_acc, DOT, UPCAST_DOT)
    SCALE_PRODUCTS: tl.constexpr = NORM and not DOT
    if SCALE_PRODUCTS:
        inverse_rms = rows_inverse_rms(tl.sum(squares, axis=1), K, epsilon)
    result = _output_columns(acc, inverse_rms, bias, columns, in_n, SCALE_PRODUCTS, DOT, HAS_BIAS)
    if GATED:
        up = _output_columns(up_acc, inverse_rms, bias + N, columns, in_n, SCALE_PRODUCTS, DOT, HAS_BIAS)
        result = result / (1.0 + tl.exp(-result)) * up
    out_pointers = out + row_ids.to(tl.int64)[:, None] * out_stride + columns[None, :]
    mask = in_rows[:, None] & in_n[None, :]
    if ACCUMULATE:  # a program reads and writes only its own output columns: no race
        result += tl.load(out_pointers, mask=mask, other=0.0).to(tl.float32)
    # Rounded to the activation dtype here; the unfused ops also round the GEMM's output and SiLU's
    # (docs/ops.md, "linear").
    tl.store(out_pointers, result.to(out.dtype.element_ty), mask=mask)


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
# ones there (tests/backends/test_triton_linear.py runs ONE_ROW and TILED themselves).
INTERPRETER_BLOCK_N = 64


def skinny_launch(rows: int, gated: bool = False) -> SkinnyLaunch:
    launch = ONE_ROW if rows == 1 else TILED
    if INTERPRETED:
        return dataclasses.replace(launch, block_n=INTERPRETER_BLOCK_N)
    if gated:
        # Two weight rows per output column: half the columns per program keep a program's weight bytes
        # in flight, registers and shared memory near the plain launch's (docs/benchmarks.md: compiled
        # for sm_90, whole column blocks would leave one 16-row-tile block on an SM instead of two).
        return dataclasses.replace(launch, block_n=launch.block_n // 2)
    return launch


def launch_skinny_linear(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    launch: SkinnyLaunch,
    upcast: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,
    gated: bool = False,
    accumulate: bool = False,
) -> None:
    """out[rows, N] = x[rows, K] @ weight[N, K].T (+ bias); 2-D tensors, contiguous in their last dimension.

    norm=(norm_weight, eps): of rms_norm(x) * norm_weight. gated: weight (and bias) hold 2N rows, gate
    then up, and out = silu(gate) * up. accumulate: out += the result."""
    rows, k = x.shape
    n = out.shape[1]
    norm_weight, epsilon = norm if norm is not None else (x, 0.0)
    skinny_linear_kernel[(triton.cdiv(n, launch.block_n),)](
        out, x, weight, x if bias is None else bias, norm_weight, rows, n, k, epsilon, out.stride(0),
        x.stride(0), weight.stride(0), HAS_BIAS=bias is not None, NORM=norm is not None, GATED=gated,
        ACCUMULATE=accumulate, DOT=launch.dot, EVEN_K=k % launch.block_k == 0,
        UPCAST_DOT=upcast or x.dtype == torch.float32, BLOCK_M=MAX_ROWS if launch.dot else 1,
        BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _checked_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **others: torch.Tensor
) -> torch.Tensor:
    """x as [rows, K] rows contiguous in K, after checking it against the weight; ValueError/TypeError."""
    checks.activation_dtype(OP, BACKEND, x, weight, *(t for t in (bias, *others.values()) if t is not None))
    checks.inner_contiguous(OP, weight=weight, bias=bias, **others)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{OP}: input of {x.shape[-1]} features for a weight of shape {tuple(weight.shape)}")
    x2 = x.reshape(_rows(x), x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias: skinny_linear_kernel for up to MAX_ROWS rows, torch's GEMM for more."""
    rows = _rows(x)
    if rows > MAX_ROWS or rows == 0:
        return F.linear(x, weight, bias)
    x2 = _checked_rows(x, weight, bias)
    out = x.new_empty((rows, weight.shape[0]))
    launch_skinny_linear(out, x2, weight, bias, skinny_launch(rows), upcast_dot(x.dtype))
    return out.view(*x.shape[:-1], weight.shape[0])


def _check_fusable(x: torch.Tensor) -> int:
    rows = _rows(x)
    if not 0 < rows <= MAX_ROWS:
        raise ValueError(f"{OP}: the fused GEMMs take 1 to {MAX_ROWS} rows, got {rows}")
    return rows


def norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    epsilon: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """rms_norm(x) * norm_weight @ weight.T + bias for up to MAX_ROWS rows of x [..., K], in one kernel;
    gated: silu(gate) * up of that product's two halves (weight [2N, K] -> out [..., N])."""
    rows = _check_fusable(x)
    x2 = _checked_rows(x, weight, bias, norm_weight=norm_weight)
    if norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"{OP}: norm weight of shape {tuple(norm_weight.shape)} for {x.shape[-1]} features")
    width = weight.shape[0]
    if gated and width % 2:
        raise ValueError(
            f"{OP}: a gated GEMM needs an even number of weight rows (gate, then up), got {width}"
        )
    width = width // 2 if gated else width
    out = x.new_empty((rows, width))
    launch = skinny_launch(rows, gated)
    launch_skinny_linear(out, x2, weight, bias, launch, upcast_dot(x.dtype), (norm_weight, epsilon), gated)
    return out.view(*x.shape[:-1], width)


def linear_add_(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """residual += x @ weight.T + bias for up to MAX_ROWS rows, in one kernel; returns residual."""
    rows = _check_fusable(x)
    x2 = _checked_rows(x, weight, bias, residual=residual)
    if residual.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(
            f"{OP}: residual of shape {tuple(residual.shape)} for an output of "
            f"{(*x.shape[:-1], weight.shape[0])}"
        )
    out = checks.rows(OP, "residual", residual)
    launch_skinny_linear(out, x2, weight, bias, skinny_launch(rows), upcast_dot(x.dtype), accumulate=True)
    return residual


FUSIONS = GemmFusions(MAX_ROWS, norm_linear, linear_add_)
