"""rotary_embedding_kv_write and kv_write in Triton: one program per token rotates its query and key heads
(rotate-half, every product rounded to the activation dtype as the reference does) and writes its key and
value rows into the cache, quantized to FP8 when asked."""

from __future__ import annotations

import triton
import triton.language as tl

from xpu_coopt.backends.triton.codecs import store_rows


@triton.jit
def _rotate(pointer, heads, head_dim, cos, sin, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates heads [heads, head_dim] at pointer (heads head_dim apart) in place."""
    half = head_dim // 2
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < heads) & (j < half)
    first = pointer + h * head_dim + j
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + half, mask=mask, other=0.0)
    dtype = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    rotated1 = (a * cos).to(dtype).to(tl.float32) - (b * sin).to(dtype).to(tl.float32)
    rotated2 = (b * cos).to(dtype).to(tl.float32) + (a * sin).to(dtype).to(tl.float32)
    tl.store(first, rotated1.to(dtype), mask=mask)
    tl.store(first + half, rotated2.to(dtype), mask=mask)


@triton.jit
def _write(source, kv_heads, head_dim, cache, scale, cache_head_stride, scale_head_stride,
           STATIC_SCALE: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, FORMAT: tl.constexpr, MANTISSA: tl.constexpr,
           BIAS: tl.constexpr, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr):  # fmt: skip
    h = tl.arange(0, BLOCK_KV)
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h[:, None] < kv_heads) & (d < head_dim)
    x = tl.load(source + h[:, None] * head_dim + d, mask=mask, other=0.0).to(tl.float32)
    store_rows(x, mask, cache + h[:, None] * cache_head_stride + d, scale + h * scale_head_stride, STATIC_SCALE,
               FORMAT, MANTISSA, BIAS, FP8_MAX, MIN_NORMAL, SUB_SCALE)  # fmt: skip


@triton.jit
def rotary_kv_write_kernel(
    query, key, value, cos_sin, k_cache, v_cache, k_scale, v_scale, cache_rows, cache_positions,
    heads, kv_heads, head_dim, query_stride, key_stride, value_stride, cos_sin_stride,
    cache_row_stride, cache_head_stride, cache_position_stride,
    scale_row_stride, scale_head_stride, scale_position_stride,
    ROTATE: tl.constexpr, STATIC_SCALE: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, FORMAT: tl.constexpr, MANTISSA: tl.constexpr, BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr, SUB_UNIT: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    token_key = key + token * key_stride
    if ROTATE:
        half = head_dim // 2
        j = tl.arange(0, BLOCK_HALF)[None, :]
        row = cos_sin + token * cos_sin_stride
        cos = tl.load(row + j, mask=j < half, other=0.0).to(tl.float32)
        sin = tl.load(row + half + j, mask=j < half, other=0.0).to(tl.float32)
        _rotate(query + token * query_stride, heads, head_dim, cos, sin, BLOCK_HEADS, BLOCK_HALF)
        _rotate(token_key, kv_heads, head_dim, cos, sin, BLOCK_KV, BLOCK_HALF)
        tl.debug_barrier()  # the rotated key is read back below, possibly by other threads
    cache_at = (
        tl.load(cache_rows + token) * cache_row_stride
        + tl.load(cache_positions + token) * cache_position_stride
    )
    scale_at = (
        tl.load(cache_rows + token) * scale_row_stride
        + tl.load(cache_positions + token) * scale_position_stride
    )
    _write(token_key, kv_heads, head_dim, k_cache + cache_at, k_scale + scale_at, cache_head_stride,
           scale_head_stride, STATIC_SCALE, BLOCK_KV, BLOCK_D, FORMAT, MANTISSA, BIAS, FP8_MAX, MIN_NORMAL, SUB_SCALE)  # fmt: skip
    _write(value + token * value_stride, kv_heads, head_dim, v_cache + cache_at, v_scale + scale_at,
           cache_head_stride, scale_head_stride, STATIC_SCALE, BLOCK_KV, BLOCK_D, FORMAT, MANTISSA, BIAS, FP8_MAX,
           MIN_NORMAL, SUB_SCALE)  # fmt: skip
