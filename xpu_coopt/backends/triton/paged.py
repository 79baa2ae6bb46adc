"""paged_attention in Triton: one launch a step. A program takes a block of one sequence's queries and one
query head, and reads that sequence's K/V where they lie, cell by cell through its block table, into the
same online softmax as the other attention kernels (attention.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from xpu_coopt.backends.triton.attention import _attend_block


@triton.jit
def paged_attention_kernel(
    out, query, k_pool, v_pool, k_scale, v_scale, block_tables, query_start, context_lens,
    heads, kv_heads, head_dim, block_size, scale, window,
    query_token_stride, query_head_stride, out_token_stride, out_head_stride, table_stride,
    k_block_stride, k_head_stride, k_cell_stride, v_block_stride, v_head_stride, v_cell_stride,
    ks_block_stride, ks_head_stride, vs_block_stride, vs_head_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
    NATIVE_FP8: tl.constexpr, V_BOOST: tl.constexpr, FORMAT: tl.constexpr, MANTISSA: tl.constexpr,
    BIAS: tl.constexpr, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr,
    SUB_UNIT: tl.constexpr,
):  # fmt: skip
    """Program = (block of BLOCK_M queries, sequence x query head). The sequence's queries are its last
    positions; query i (position context - queries + i) attends to keys up to it, its last `window`."""
    block = tl.program_id(0)
    sequence = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    kv = h // (heads // kv_heads)
    first_query = tl.load(query_start + sequence)
    queries = tl.load(query_start + sequence + 1) - first_query
    if (
        block * BLOCK_M < queries
    ):  # programs past a sequence's queries (the grid covers the longest) do nothing
        context = tl.load(context_lens + sequence)
        offset = context - queries
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < queries
        tokens = (first_query + rows).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(query + tokens[:, None] * query_token_stride + h * query_head_stride + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table = block_tables + sequence.to(tl.int64) * table_stride
        # Causal: no key after the block's last query, nor before its first query's window.
        last = tl.minimum(offset + (block + 1) * BLOCK_M, context)
        first_key = tl.maximum(0, offset + block * BLOCK_M - window + 1)
        for first in range(first_key // BLOCK_N * BLOCK_N, last, BLOCK_N):
            keys = first + tl.arange(0, BLOCK_N)
            column_ok = keys < context
            physical = tl.load(table + keys // block_size, mask=column_ok, other=0).to(tl.int64)
            cell = keys % block_size
            k_cells = k_pool + physical * k_block_stride + kv * k_head_stride + cell * k_cell_stride  # [N]
            v_cells = v_pool + physical * v_block_stride + kv * v_head_stride + cell * v_cell_stride
            distance = (offset + rows)[:, None] - keys[None, :]
            visible = (distance >= 0) & (distance < window) & row_ok[:, None] & column_ok[None, :]
            row_max, row_sum, acc = _attend_block(
                q, k_cells[None, :] + d[:, None], v_cells[:, None] + d[None, :],
                k_scale + physical * ks_block_stride + kv * ks_head_stride + cell,
                v_scale + physical * vs_block_stride + kv * vs_head_stride + cell,
                column_ok, d_ok, visible, scale, row_max, row_sum, acc,
                FORMAT, MANTISSA, BIAS, SUB_UNIT, NATIVE_FP8, UPCAST_DOT, False, V_BOOST,
            )  # fmt: skip
        if FORMAT != 0:  # V's products were taken V_BOOST times larger (_attend_block)
            acc = acc * (1.0 / V_BOOST)
        result = tl.where(row_sum[:, None] > 0, acc / tl.maximum(row_sum, 1e-30)[:, None], 0.0)
        tl.store(out + tokens[:, None] * out_token_stride + h * out_head_stride + d[None, :],
                 result.to(out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
