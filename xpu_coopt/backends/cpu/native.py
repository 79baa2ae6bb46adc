"""The CPU backend's native kernels: cpp/*.cpp, built once per machine with the host compiler
(-O3 -march=native -fopenmp; backends/native_build.py keeps the library in the disk cache) and called
through ctypes on torch CPU tensors' memory.

They run where torch's own kernels pay more in overhead than in work: a decode step's attention of a few
query rows (torch's flash kernel for CPU took 110-160 us a SmolLM2 layer at 1,056 columns on 2 threads,
the native kernel 41 us), a layer's norms, SiLU and rotary + KV write (one call each instead of torch's
5-15 ops a call), and the GEMV of grouped 8-bit weights (GGUF Q8_0, Q6_K), which torch lacks.

Where the library cannot be built (no compiler), the first use warns once, naming what to install, and
the callers run torch's kernels (kernels.py, rows_attention.py); XPU_COOPT_CPU_NATIVE=0 picks those
without a warning.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import torch

from xpu_coopt.backends.native_build import build_library
from xpu_coopt.errors import BackendUnavailableError

SOURCES = [
    Path(__file__).with_name("cpp") / name for name in ("attention.cpp", "layer_ops.cpp", "linear_int8.cpp")
]
# -fopenmp: the library's parallel loops run on torch's OpenMP runtime, which torch has loaded already (the
# same libgomp.so.1), so they share its threads and torch.set_num_threads. -ffp-contract=off: a product
# is rounded before it is added, as in torch's kernels (no fused multiply-add), so the rotation gives
# their bits.
FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
NATIVE_VARIABLE = "XPU_COOPT_CPU_NATIVE"
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}

_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the library cannot be had, once found out


def _cpu_features() -> str:
    """The CPU's instruction sets, part of the library's cache key: it is built for this CPU."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def _declare(library: ctypes.CDLL) -> None:
    pointer, size, code, number = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    rows = [pointer, size]  # a tensor's rows: data and row stride
    signatures = {
        "xc_attend_rows": [code, *[pointer, size, size, size] * 3, pointer, pointer, pointer, *[size] * 5, number],
        "xc_rms_norm": [code, *rows, *rows, pointer, size, size, number],
        "xc_fused_add_rms_norm": [code, *rows, *rows, pointer, size, size, number],
        "xc_silu_and_mul": [code, *rows, *rows, size, size],
        "xc_rotary_kv_write": [code, *[pointer, size, size] * 3, *rows, pointer, pointer, *[size] * 3,
                               pointer, pointer, *[size] * 4],
        "xc_linear_int8": [code, *rows, size, size, pointer, pointer, size, size, pointer, *rows],
    }  # fmt: skip
    for name, arguments in signatures.items():
        function = getattr(library, name)
        function.restype, function.argtypes = ctypes.c_int, arguments


def library() -> ctypes.CDLL | None:
    """The loaded native library, built on first use; None where XPU_COOPT_CPU_NATIVE=0 or no compiler
    can build it (warned once)."""
    global _library, _unavailable
    if _library is not None or _unavailable is not None:
        return _library
    if os.environ.get(NATIVE_VARIABLE, "1") == "0":
        _unavailable = f"{NATIVE_VARIABLE}=0"
        return None
    try:
        path = build_library(
            "cpu_kernels", SOURCES, FLAGS, (), "xpu_coopt's native CPU kernels", [_cpu_features()]
        )
    except BackendUnavailableError as error:
        _unavailable = str(error)
        warnings.warn(
            f"{error}. Until then the CPU backend runs torch's kernels where it has native ones: a decode "
            f"step about 1.5x slower. Set {NATIVE_VARIABLE}=0 to choose that without this warning.",
            stacklevel=3,
        )
        return None
    loaded = ctypes.CDLL(str(path))
    _declare(loaded)
    _library = loaded
    return _library


def attend_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    first_column: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The native kernel of rows_attention.attend_rows (same arguments and results): the library must
    be loaded (library() is not None)."""
    batch, heads, rows, dim = query.shape
    out = torch.empty((batch, heads, rows, dim), dtype=query.dtype) if out is None else out
    lse = torch.empty((batch, heads, rows), dtype=torch.float32)
    _check(_library.xc_attend_rows(
        DTYPE_CODES[query.dtype],
        query.data_ptr(), *query.stride()[:3],
        key.data_ptr(), *key.stride()[:3],
        value.data_ptr(), *value.stride()[:3],
        out.data_ptr(), lse.data_ptr(), None if first_column is None else first_column.data_ptr(),
        batch, heads, rows, key.shape[2], dim, scale,
    ), "attend_rows")  # fmt: skip
    return out, lse


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    """out = weight * rms_norm(input), rows [rows, hidden] with contiguous values (NormCall's)."""
    _check(_library.xc_rms_norm(DTYPE_CODES[input.dtype], out.data_ptr(), out.stride(0), input.data_ptr(),
                                input.stride(0), weight.data_ptr(), *input.shape, epsilon), "rms_norm")  # fmt: skip


def fused_add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> None:
    """residual += input; input = weight * rms_norm(residual) (AddNormCall's rows)."""
    _check(_library.xc_fused_add_rms_norm(DTYPE_CODES[input.dtype], input.data_ptr(), input.stride(0),
                                          residual.data_ptr(), residual.stride(0), weight.data_ptr(),
                                          *input.shape, epsilon), "fused_add_rms_norm")  # fmt: skip


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """out [rows, d] = silu(gate) * up of input [rows, 2d] = [gate | up] (SiluCall's rows)."""
    _check(_library.xc_silu_and_mul(DTYPE_CODES[input.dtype], out.data_ptr(), out.stride(0), input.data_ptr(),
                                    input.stride(0), *out.shape), "silu_and_mul")  # fmt: skip


def rotary_kv_write(call) -> None:
    """rotary_embedding_kv_write (kv_write where call.query is None) of a KVWriteCall whose cache holds
    the activation dtype: q and k rotated in place, k and v written into their cells."""
    query, key, value, cos_sin = call.query, call.key, call.value, call.cos_sin
    k_cache, v_cache = call.cache[0], call.cache[1]
    rotated = query is not None
    _check(_library.xc_rotary_kv_write(
        DTYPE_CODES[key.dtype],
        query.data_ptr() if rotated else None, *(query.stride()[:2] if rotated else (0, 0)),
        key.data_ptr(), *key.stride()[:2], value.data_ptr(), *value.stride()[:2],
        cos_sin.data_ptr() if rotated else None, cos_sin.stride(0) if rotated else 0,
        k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.stride()[:3],
        call.cache_rows.data_ptr(), call.cache_positions.data_ptr(),
        key.shape[0], query.shape[1] if rotated else 0, key.shape[1], key.shape[2],
    ), "rotary_kv_write")  # fmt: skip


def linear_int8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """x [rows, K] (values contiguous) @ (codes * scales).T + bias: codes int8 [N, K], scales float32
    [N, K / group_size] (both contiguous), group_size a multiple of 16."""
    rows, k_dim = x.shape
    out = torch.empty((rows, codes.shape[0]), dtype=x.dtype)
    _check(_library.xc_linear_int8(
        DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), rows, k_dim, codes.data_ptr(), scales.data_ptr(),
        group_size, codes.shape[0], None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0),
    ), "linear_int8")  # fmt: skip
    return out


def _check(status: int, op: str) -> None:
    if status != 0:
        raise RuntimeError(f"the native CPU kernel {op} failed with status {status}")
