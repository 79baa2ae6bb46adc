"""Compiles every Triton kernel, as the op wrappers launch it, for NVIDIA GPU targets, without a GPU.

The interpreter (which runs the kernels in the other tests) is lenient: it accepts block shapes, dtypes
and constructs that the real compiler rejects. This script runs each wrapper of xpu_coopt.triton.kernels
on CPU tensors with the kernels' launch replaced by triton.compile(..., target=sm_XX) down to a cubin,
so CI proves that the exact launches the wrappers make compile. Run by tests/test_triton.py in a
process without TRITON_INTERPRET; prints one line per compiled launch, then "compiled N launches".
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the interpreter"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import xpu_coopt.triton.kernels as K  # noqa: E402
from xpu_coopt.ops import fp8  # noqa: E402

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
                 torch.int32: "*i32", torch.int64: "*i64"}  # fmt: skip
TARGETS = [GPUTarget("cuda", capability, 32) for capability in (80, 90)]
compiled: list[str] = []


def _signature(kernel, args, kwargs):
    signature, constexprs = {}, {}
    for name, value in zip(kernel.arg_names, list(args) + [None] * len(kernel.arg_names), strict=False):
        if name in kwargs:
            signature[name], constexprs[name] = "constexpr", kwargs[name]
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs


class _Compile:
    """Stands in for kernel[grid]: compiles for every target instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            signature, constexprs = _signature(self.kernel, args, kwargs)
            for target in TARGETS:
                if "NATIVE_FP8" in constexprs:  # as on a GPU of that target: FP8 instructions from sm_89
                    constexprs["NATIVE_FP8"] = target.arch >= 89
                triton.compile(ASTSource(self.kernel, signature, constexprs), target=target)
            compiled.append(f"{self.kernel.fn.__name__} {constexprs}")
            print(compiled[-1], flush=True)

        return launch


for name in ("rms_norm_kernel", "fused_add_rms_norm_kernel", "silu_and_mul_kernel", "rotary_kv_write_kernel",
             "attention_prefill_kernel", "segment_attention_decode_kernel", "combine_splits_kernel"):  # fmt: skip
    setattr(K, name, _Compile(getattr(K, name)))
K._programs_to_fill = lambda device: 264  # as on an H100 (132 SMs), so long segments are split


def _cache(shape, kv_format, dtype):
    if fp8.is_fp8(kv_format):
        return torch.zeros(shape, dtype=torch.uint8), torch.ones(shape[:-1], dtype=fp8.SCALE_DTYPE)
    return torch.zeros(shape, dtype=dtype), None


def main() -> None:
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if "--all" in sys.argv else [torch.bfloat16]
    for dtype in dtypes:
        x = torch.randn(3, 576, dtype=dtype)
        K.rms_norm(torch.empty_like(x), x, torch.ones(576, dtype=dtype), 1e-5)
        K.fused_add_rms_norm(x, x.clone(), torch.ones(576, dtype=dtype), 1e-5)
        K.silu_and_mul(x[:, :288].clone(), x)
        q, k = torch.randn(4, 2, 7, 64, dtype=dtype), torch.randn(4, 2, 1, 64, dtype=dtype)
        K.attention_prefill(torch.empty_like(q), q, k, k.clone(), torch.zeros(4, dtype=torch.int32), 0.125)
        for kv_format in ("auto", "fp8_e4m3", "fp8_e5m2"):
            query, key = torch.randn(5, 8, 64, dtype=dtype), torch.randn(5, 2, 64, dtype=dtype)
            cache, scale = _cache((3, 2, 9, 64), kv_format, dtype)
            rows, columns = torch.zeros(5, dtype=torch.int64), torch.arange(5)
            K.rotary_embedding_kv_write(query, key, key.clone(), torch.randn(5, 64, dtype=dtype), cache,
                                        cache.clone(), scale, scale, rows, columns, kv_format)  # fmt: skip
            K.kv_write(key, key.clone(), cache, cache.clone(), scale, scale, rows, columns, kv_format)
            if scale is not None:  # per-tensor static scales, broadcast with zero strides
                static = torch.ones(1, dtype=fp8.SCALE_DTYPE).expand(scale.shape)
                K.kv_write(
                    key, key.clone(), cache, cache.clone(), static, static, rows, columns, kv_format, True
                )
            response, response_scale = _cache((8, 2, 5, 64), kv_format, dtype)
            decode_query = torch.randn(8, 8, 64, dtype=dtype)
            K.segment_attention_decode(
                torch.empty_like(decode_query), decode_query, cache[:2], cache[:2], scale if scale is None else scale[:2],
                scale if scale is None else scale[:2], torch.zeros(2, dtype=torch.int32), response, response,
                response_scale, response_scale, torch.zeros(8, 5, dtype=torch.int32), 3, 0.125, kv_format,
            )  # fmt: skip
            # A long prompt segment (split decode and the combine) with device-side lengths (graph replay).
            long_cache, long_scale = _cache((2, 2, 600, 64), kv_format, dtype)
            K.segment_attention_decode(
                torch.empty_like(decode_query), decode_query, long_cache, long_cache, long_scale, long_scale,
                torch.zeros(2, dtype=torch.int32), response, response, response_scale, response_scale,
                torch.zeros(8, 5, dtype=torch.int32), 5, 0.125, kv_format, torch.tensor([500, 3], dtype=torch.int32),
            )  # fmt: skip
    print(f"compiled {len(compiled)} launches for {[t.arch for t in TARGETS]}")


if __name__ == "__main__":
    main()
