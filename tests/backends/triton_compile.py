"""Compiles every Triton kernel, as the op wrappers launch it, for NVIDIA GPU targets, without a GPU.

The interpreter (which runs the kernels in the other tests) is lenient: it accepts block shapes, dtypes
and constructs that the real compiler rejects. This script runs each wrapper of xpu_coopt.backends.triton.kernels
and .linear on CPU tensors within xpu_coopt.backends.triton.offline.compile_for(sm_XX), which compiles every launch
down to a cubin through Triton's own launch path instead of running it, so CI proves that the exact
launches the wrappers make compile. Run by tests/backends/test_triton.py in a process without TRITON_INTERPRET; prints one line
per compiled launch, then "compiled N launches for [targets]".
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the interpreter"

import xpu_coopt.backends.triton.kernels as K  # noqa: E402
from xpu_coopt.backends.triton import linear, offline  # noqa: E402
from xpu_coopt.ops import fp8  # noqa: E402

CAPABILITIES = (80, 90)


def _cache(shape, kv_dtype, dtype):
    if fp8.is_fp8(kv_dtype):
        return torch.zeros(shape, dtype=torch.uint8), torch.ones(shape[:-1], dtype=fp8.SCALE_DTYPE)
    return torch.zeros(shape, dtype=dtype), None


def launch_all(dtypes: list[torch.dtype]) -> None:
    """Every wrapper, with every KV format, as generation calls them (short and split decode)."""
    for dtype in dtypes:
        x = torch.randn(3, 576, dtype=dtype)
        K.ENTRIES.rms_norm(torch.empty_like(x), x, torch.ones(576, dtype=dtype), 1e-5)
        K.ENTRIES.fused_add_rms_norm(x, x.clone(), torch.ones(576, dtype=dtype), 1e-5)
        K.ENTRIES.silu_and_mul(x[:, :288].clone(), x)
        weight = torch.randn(100, 576, dtype=dtype)
        linear.linear(x[:1], weight)  # one row: elementwise
        linear.linear(x, weight, torch.randn(100, dtype=dtype))  # a few rows through tl.dot, with a bias
        # K a multiple of both K blocks: loads without a K mask
        even, even_weight = torch.randn(3, 1024, dtype=dtype), torch.randn(100, 1024, dtype=dtype)
        linear.linear(even[:1], even_weight)
        linear.linear(even, even_weight)
        # The fused GEMMs of a decode step (xpu_coopt/model/decoder.py): the norm before, SiLU * up or a residual add
        # after; with K a multiple of the K block too for the fullest of them.
        norm, even_norm = torch.ones(576, dtype=dtype), torch.ones(1024, dtype=dtype)
        for rows in (x[:1], x):
            linear.norm_linear(rows, norm, 1e-5, weight)
            linear.norm_linear(rows, norm, 1e-5, weight, gated=True)
            linear.linear_add_(rows, weight, None, torch.zeros(rows.shape[0], 100, dtype=dtype))
        for rows in (even[:1], even):
            linear.norm_linear(rows, even_norm, 1e-5, even_weight, gated=True)
        q, k = torch.randn(4, 2, 7, 64, dtype=dtype), torch.randn(4, 2, 1, 64, dtype=dtype)
        K.ENTRIES.attention_prefill(
            torch.empty_like(q), q, k, k.clone(), torch.zeros(4, dtype=torch.int32), 0.125
        )
        for kv_dtype in ("auto", "fp8_e4m3", "fp8_e5m2"):
            query, key = torch.randn(5, 8, 64, dtype=dtype), torch.randn(5, 2, 64, dtype=dtype)
            cache, scale = _cache((3, 2, 9, 64), kv_dtype, dtype)
            rows, columns = torch.zeros(5, dtype=torch.int64), torch.arange(5)
            K.ENTRIES.rotary_embedding_kv_write(query, key, key.clone(), torch.randn(5, 64, dtype=dtype), cache,
                                        cache.clone(), scale, scale, rows, columns, kv_dtype)  # fmt: skip
            K.ENTRIES.kv_write(key, key.clone(), cache, cache.clone(), scale, scale, rows, columns, kv_dtype)
            if scale is not None:  # per-tensor static scales, broadcast with zero strides
                static = torch.ones(1, dtype=fp8.SCALE_DTYPE).expand(scale.shape)
                K.ENTRIES.kv_write(
                    key, key.clone(), cache, cache.clone(), static, static, rows, columns, kv_dtype, True
                )
            response, response_scale = _cache((8, 2, 5, 64), kv_dtype, dtype)
            decode_query = torch.randn(8, 8, 64, dtype=dtype)
            K.ENTRIES.segment_attention_decode(
                torch.empty_like(decode_query), decode_query, cache[:2], cache[:2], scale if scale is None else scale[:2],
                scale if scale is None else scale[:2], torch.zeros(2, dtype=torch.int32), response, response,
                response_scale, response_scale, torch.zeros(8, 5, dtype=torch.int32), 3, 0.125, kv_dtype,
            )  # fmt: skip
            # A long prompt segment (split decode and the combine) with device-side lengths (graph replay).
            long_cache, long_scale = _cache((2, 2, 600, 64), kv_dtype, dtype)
            K.ENTRIES.segment_attention_decode(
                torch.empty_like(decode_query), decode_query, long_cache, long_cache, long_scale, long_scale,
                torch.zeros(2, dtype=torch.int32), response, response, response_scale, response_scale,
                torch.zeros(8, 5, dtype=torch.int32), 5, 0.125, kv_dtype, torch.tensor([500, 3], dtype=torch.int32),
            )  # fmt: skip
            # A ring under a window (a one-beam segment cache past its columns): 2000 columns in its 600 cells.
            K.ENTRIES.segment_attention_decode(
                torch.empty_like(decode_query), decode_query, long_cache, long_cache, long_scale, long_scale,
                torch.zeros(2, dtype=torch.int32), response, response, response_scale, response_scale,
                torch.zeros(8, 5, dtype=torch.int32), 5, 0.125, kv_dtype, torch.tensor([2000, 0], dtype=torch.int32),
                None, -1, 512,
            )  # fmt: skip
            # A paged prompt segment: the long cache's 600 columns as 75 blocks of 8, read through a table.
            blocks, block_scales = _cache((75, 2, 8, 64), kv_dtype, dtype)
            K.ENTRIES.segment_attention_decode(
                torch.empty_like(decode_query), decode_query, blocks, blocks, block_scales, block_scales,
                torch.zeros(2, dtype=torch.int32), response, response, response_scale, response_scale,
                torch.zeros(8, 5, dtype=torch.int32), 5, 0.125, kv_dtype, None,
                torch.arange(150, dtype=torch.int32).view(2, 75) % 75, 590,
            )  # fmt: skip
            # The serving engine's ragged step over the same blocks: a decode beside a 5-token prompt chunk.
            step_query = torch.randn(6, 8, 64, dtype=dtype)
            K.ENTRIES.paged_attention(
                torch.empty_like(step_query), step_query, blocks, blocks, block_scales, block_scales,
                torch.arange(150, dtype=torch.int32).view(2, 75) % 75, torch.tensor([0, 1, 6], dtype=torch.int32),
                torch.tensor([40, 30], dtype=torch.int32), 0.125, kv_dtype,
            )  # fmt: skip
            if scale is not None:  # the tuning option that converts FP8 tiles before their dot layout
                launch = K.DECODE_LAUNCH
                K.DECODE_LAUNCH = dataclasses.replace(launch, fp8_upcast_in_registers=True)
                try:
                    K.ENTRIES.segment_attention_decode(
                        torch.empty_like(decode_query), decode_query, long_cache, long_cache, long_scale, long_scale,
                        torch.zeros(2, dtype=torch.int32), response, response, response_scale, response_scale,
                        torch.zeros(8, 5, dtype=torch.int32), 5, 0.125, kv_dtype,
                    )  # fmt: skip
                finally:
                    K.DECODE_LAUNCH = launch


def main() -> None:
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if "--all" in sys.argv else [torch.bfloat16]
    counts = []
    for capability in CAPABILITIES:
        with offline.compile_for(capability) as launches:
            launch_all(dtypes)
        for launch in launches:
            print(f"sm_{capability} {launch.name} {launch.constexprs}", flush=True)
        counts.append(len(launches))
    assert len(set(counts)) == 1, f"launches per target differ: {counts}"
    print(f"compiled {counts[0]} launches for {list(CAPABILITIES)}")


if __name__ == "__main__":
    main()
