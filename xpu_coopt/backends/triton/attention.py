"""attention_prefill and segment_attention_decode in Triton, flash-attention style: scores and the
softmax are float32, computed block by block with an online softmax, and never stored."""

from __future__ import annotations

import triton
import triton.language as tl

from xpu_coopt.backends.triton.codecs import load_unscaled


@triton.jit
def _online_softmax(scores, row_max, row_sum, acc):
    """Folds one block of float32 scores [rows, keys] (-inf where masked) into the running row_max,
    row_sum and the rescaled accumulator; returns (p, row_max, row_sum, acc), p the block's weights
    (0 where masked). Rows with every key masked so far keep row_max = -inf and contribute nothing."""
    new_m = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    correction = tl.exp(row_max - safe_m)
    p = tl.exp(scores - safe_m[:, None])
    return p, new_m, row_sum * correction + tl.sum(p, axis=1), acc * correction[:, None]


@triton.jit
def _scaled(x, scales, FORMAT: tl.constexpr):
    """x times its cache rows' scales (FP8 formats); a 16-bit cache has none, and no multiply: multiplying
    by ones took the float16 kernel at 4 beams from 202 to 255 registers (scripts/decode_kernel_resources.py)."""
    if FORMAT != 0:
        x = x * scales
    return x


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b, accumulated in float32. UPCAST multiplies in float32 instead (exact for 16-bit inputs, so
    the same result): Triton 3.9's interpreter gets bfloat16 tl.dot wrong."""
    if UPCAST:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a, b, input_precision="ieee")
    return result


@triton.jit
def _attend_block(
    q, k_pointers, v_pointers, k_scale_pointers, v_scale_pointers, column_ok, d_ok, visible, scale,
    row_max, row_sum, acc, FORMAT: tl.constexpr, MANTISSA: tl.constexpr, BIAS: tl.constexpr,
    SUB_UNIT: tl.constexpr, NATIVE_FP8: tl.constexpr, UPCAST_DOT: tl.constexpr, UPCAST_IN_REGISTERS: tl.constexpr,
    V_BOOST: tl.constexpr,
):  # fmt: skip
    """Folds one block of cache columns into a decode program's online softmax: K^T [D, columns] and
    V [columns, D] through their pointers (cells of columns not column_ok are never read), scores of q
    [rows, D] masked by visible [rows, columns]. FP8 cells stay unscaled 16-bit values: K's scale (one per
    column) multiplies the scores and V's the softmax weights, one multiply per key instead of one per
    element. The weights times V's scales are rounded to the activation dtype for tl.dot: in float16 they
    would fall among its subnormals (an e5m2 scale is amax / 57344), losing up to all their bits, so they
    are taken V_BOOST times larger (segment_attention_decode's choice: FP8_MAX / 2), and acc with them;
    the caller divides it by V_BOOST at the end. Returns the new (row_max, row_sum, acc)."""
    dtype = q.dtype
    k, k_scale = load_unscaled(k_pointers, column_ok[None, :] & d_ok[:, None], k_scale_pointers, column_ok,
                               dtype, FORMAT, MANTISSA, BIAS, SUB_UNIT, NATIVE_FP8, UPCAST_IN_REGISTERS)  # fmt: skip
    scores = _dot(q, k, UPCAST_DOT) * _scaled(scale, k_scale[None, :], FORMAT)
    p, row_max, row_sum, acc = _online_softmax(
        tl.where(visible, scores, float("-inf")), row_max, row_sum, acc
    )
    v, v_scale = load_unscaled(v_pointers, column_ok[:, None] & d_ok[None, :], v_scale_pointers, column_ok,
                               dtype, FORMAT, MANTISSA, BIAS, SUB_UNIT, NATIVE_FP8, UPCAST_IN_REGISTERS)  # fmt: skip
    acc += _dot(_scaled(p, v_scale[None, :] * V_BOOST, FORMAT).to(dtype), v, UPCAST_DOT)
    return row_max, row_sum, acc


@triton.jit
def attention_prefill_kernel(
    out, query, key, value, seq_start, queries, columns, heads, kv_heads, head_dim, scale, window,
    query_batch_stride, query_token_stride, key_batch_stride, key_token_stride,
    value_batch_stride, value_token_stride, out_batch_stride, out_token_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Program = (block of BLOCK_M queries, batch row x query head). Query i is key column
    columns - queries + i and attends to its last `window` keys up to it (the host passes a window longer
    than any prompt for none)."""
    block = tl.program_id(0)
    b = (tl.program_id(1) // heads).to(tl.int64)
    h = tl.program_id(1) % heads
    kv = h // (heads // kv_heads)
    start = tl.load(seq_start + b)
    offset = columns - queries
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_columns = offset + rows
    d = tl.arange(0, BLOCK_D)
    q = tl.load(query + b * query_batch_stride + rows[:, None] * query_token_stride + h * head_dim + d[None, :],
                mask=(rows[:, None] < queries) & (d[None, :] < head_dim), other=0.0)  # fmt: skip
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Causal: no key after the block's last query's column, nor before its first query's window.
    last = tl.minimum(offset + (block + 1) * BLOCK_M, columns)
    first_key = tl.maximum(start, offset + block * BLOCK_M - window + 1)
    for first in range(first_key // BLOCK_N * BLOCK_N, last, BLOCK_N):
        keys = first + tl.arange(0, BLOCK_N)
        in_range = (keys[None, :] < columns) & (d[:, None] < head_dim)
        k = tl.load(
            key + b * key_batch_stride + keys[None, :] * key_token_stride + kv * head_dim + d[:, None],
            mask=in_range,
            other=0.0,
        )  # fmt: skip  [D, N]
        scores = _dot(q, k, UPCAST_DOT) * scale
        distance = row_columns[:, None] - keys[None, :]
        visible = (
            (keys[None, :] >= start) & (distance >= 0) & (distance < window) & (row_columns[:, None] >= start)
        )
        p, row_max, row_sum, acc = _online_softmax(
            tl.where(visible, scores, float("-inf")), row_max, row_sum, acc
        )
        v = tl.load(value + b * value_batch_stride + keys[:, None] * value_token_stride + kv * head_dim + d[None, :],
                    mask=(keys[:, None] < columns) & (d[None, :] < head_dim), other=0.0)  # fmt: skip
        acc += _dot(p.to(v.dtype), v, UPCAST_DOT)
    result = tl.where(
        row_sum[:, None] > 0, acc / tl.maximum(row_sum, 1e-30)[:, None], 0.0
    )  # padding rows: zeros
    tl.store(out + b * out_batch_stride + rows[:, None] * out_token_stride + h * head_dim + d[None, :],
             result.to(out.dtype.element_ty), mask=(rows[:, None] < queries) & (d[None, :] < head_dim))  # fmt: skip


@triton.jit
def segment_attention_decode_kernel(
    out, query, prompt_k, prompt_v, prompt_k_scale, prompt_v_scale, prompt_start,
    response_k, response_v, response_k_scale, response_v_scale, beam_slots, segment_lens,
    prompt_block_table, partial_acc, partial_stats,
    beams, kv_heads, group, rows_per_program, head_dim, prompt_len, response_len, response_cells, window,
    rows_per_split, scale,
    query_stride, out_stride, prompt_request_stride, prompt_head_stride, prompt_position_stride,
    prompt_scale_request_stride, prompt_scale_head_stride, prompt_scale_position_stride,
    response_row_stride, response_head_stride, response_position_stride,
    response_scale_row_stride, response_scale_head_stride, response_scale_position_stride,
    beam_slots_stride, block_table_stride, block_size,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BEAMS: tl.constexpr, FORMAT: tl.constexpr, MANTISSA: tl.constexpr, BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
    MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr, SUB_UNIT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    NATIVE_FP8: tl.constexpr, HAS_LENS: tl.constexpr, SPLIT: tl.constexpr, FP8_UPCAST_IN_REGISTERS: tl.constexpr,
    PAGED: tl.constexpr, RING: tl.constexpr, V_BOOST: tl.constexpr,
):  # fmt: skip
    """Program = (request, KV head, split, row chunk); its rows are every (beam, query head of the group)
    of the request where they fit in one program (the usual case), so each prompt K/V block is loaded (and
    dequantized) once for all of them; otherwise chunk c serves rows [c * rows_per_program, (c + 1) *
    rows_per_program) of the beams x group (decode_split.chunk_rows), spanning at most BEAMS beams, and the
    chunks each load the prompt. Split k covers
    the k-th of equal shares, in whole BLOCK_N tiles, of the request's prompt columns from its first
    non-padding tile to the segment's length (flash-decoding: enough programs to fill the GPU at batch
    1), and an equal share of the response segment's steps. With SPLIT, each split writes its unnormalised
    accumulator and (row max, row sum) to partial_acc / partial_stats for combine_splits_kernel; without,
    the one split writes out. With HAS_LENS the segment lengths are read from segment_lens on the device
    (prompt_len and response_len are then capacities), so a captured CUDA graph replays at any step.
    PAGED: the prompt segment is a pool of blocks of block_size columns; request r's column n lives in
    block prompt_block_table[r, n // block_size], looked up per column (a tile may span blocks). RING
    (compiled in under a window alone, else column n is at n): each segment may be a ring, the prompt's
    of block_size columns (column n held at n % block_size), the response's of response_cells (step t and
    its slot in column t % response_cells), which a window no longer than it reads whole.
    Sliding window: a sequence attends to its last `window` columns, prompt columns then response steps
    (the host passes a window longer than any sequence for none); the shares are cut from those."""
    request = (tl.program_id(0) // kv_heads).to(tl.int64)
    kv = tl.program_id(0) % kv_heads
    split = tl.program_id(1)
    if HAS_LENS:
        prompt_end = tl.load(segment_lens)
        response_end = tl.load(segment_lens + 1)
    else:
        prompt_end = prompt_len
        response_end = response_len
    first_row = tl.program_id(2) * rows_per_program  # of the request's beams x group
    rows = first_row + tl.arange(0, BLOCK_ROWS)
    end_row = tl.minimum(first_row + rows_per_program, beams * group)
    row_ok = rows < end_row
    beam = rows // group
    sequence = request * beams + beam
    h = kv * group + rows % group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(query + sequence[:, None] * query_stride + h[:, None] * head_dim + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    dtype = q.dtype
    row_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)

    # Prompt segment, shared by the request's beams; positions before `start` are padding or before the
    # window (window_first is negative where no column is dropped), never read.
    window_first = prompt_end + response_end - window
    start = tl.minimum(tl.maximum(tl.load(prompt_start + request), window_first), prompt_end)
    # The shares are cut from the columns this step reads, on the device: neither the left padding nor a
    # captured graph's unused capacity leaves a split without work while another has several shares.
    padding_tiles, end_tile = start // BLOCK_N, tl.cdiv(prompt_end, BLOCK_N)
    tiles = tl.cdiv(end_tile - padding_tiles, tl.num_programs(1))
    own_first = padding_tiles + split * tiles
    for tile in range(own_first, tl.minimum(own_first + tiles, end_tile)):
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n >= start) & (n < prompt_end)
        if PAGED:  # (the table's entries for padding columns are not read: they may name no block)
            row = tl.load(
                prompt_block_table + request * block_table_stride + n // block_size, mask=n_ok, other=0
            )
            row = row.to(tl.int64)
            column = n % block_size
        elif RING:
            row = request
            column = n % block_size
        else:
            row = request
            column = n
        cell = row * prompt_request_stride + kv * prompt_head_stride + column * prompt_position_stride
        scale_cell = (
            row * prompt_scale_request_stride
            + kv * prompt_scale_head_stride
            + column * prompt_scale_position_stride
        )
        row_max, row_sum, acc = _attend_block(
            q, prompt_k + cell[None, :] + d[:, None], prompt_v + cell[:, None] + d[None, :],
            prompt_k_scale + scale_cell, prompt_v_scale + scale_cell,
            n_ok, d_ok, n_ok[None, :] & row_ok[:, None], scale, row_max, row_sum, acc,
            FORMAT, MANTISSA, BIAS, SUB_UNIT, NATIVE_FP8, UPCAST_DOT, FP8_UPCAST_IN_REGISTERS, V_BOOST,
        )  # fmt: skip

    # Response segment: step t of sequence s lives in row beam_slots[s, t], and the rows differ per beam.
    # A block's columns are (beam, step) pairs of every beam of the program's rows: each row multiplies all
    # of them with tl.dot, as in the prompt loop, and keeps those of its own beam. That is BEAMS times the
    # products needed, on tensor cores, instead of per-row gathers reduced across the block (which set the
    # kernel's register count: docs/benchmarks.md). Its steps are shared out among the splits as the
    # prompt's columns are: in one split they would grow its share by every generated token (measured on
    # an H100: beam 4 steps from 6.5 to 9.4 ms over 128 tokens).
    c = tl.arange(0, BEAMS * BLOCK_T)
    column_beam = first_row // group + c // BLOCK_T
    own_beam = beam[:, None] == column_beam[None, :]
    column_sequence = request * beams + column_beam
    steps_first = tl.maximum(window_first - prompt_end, 0)
    per_split = tl.cdiv(response_end - steps_first, tl.num_programs(1))
    steps_begin = steps_first + split * per_split
    steps_end = tl.minimum(steps_begin + per_split, response_end)
    for first in range(steps_begin, steps_end, BLOCK_T):
        t = first + c % BLOCK_T
        c_ok = (column_beam <= (end_row - 1) // group) & (t < steps_end)
        if RING:
            t = t % response_cells
        slot = tl.load(beam_slots + column_sequence * beam_slots_stride + t, mask=c_ok, other=0).to(tl.int64)
        cell = kv * response_head_stride + slot * response_row_stride + t * response_position_stride
        scale_cell = (
            kv * response_scale_head_stride
            + slot * response_scale_row_stride
            + t * response_scale_position_stride
        )
        row_max, row_sum, acc = _attend_block(
            q, response_k + cell[None, :] + d[:, None], response_v + cell[:, None] + d[None, :],
            response_k_scale + scale_cell, response_v_scale + scale_cell,
            c_ok, d_ok, c_ok[None, :] & row_ok[:, None] & own_beam, scale, row_max, row_sum, acc,
            FORMAT, MANTISSA, BIAS, SUB_UNIT, NATIVE_FP8, UPCAST_DOT, FP8_UPCAST_IN_REGISTERS, V_BOOST,
        )  # fmt: skip

    if FORMAT != 0:  # V's products were taken V_BOOST times larger (_attend_block)
        acc = acc * (1.0 / V_BOOST)
    if SPLIT:  # partial results of this split, rows indexed by (sequence, query head)
        row = split.to(tl.int64) * rows_per_split + sequence * (kv_heads * group) + h
        tl.store(
            partial_acc + row[:, None] * head_dim + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :]
        )
        tl.store(partial_stats + row * 2, row_max, mask=row_ok)
        tl.store(partial_stats + row * 2 + 1, row_sum, mask=row_ok)
    else:
        result = acc / tl.maximum(row_sum, 1e-30)[:, None]
        tl.store(out + sequence[:, None] * out_stride + h[:, None] * head_dim + d[None, :], result.to(dtype),
                 mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def combine_splits_kernel(
    out, partial_acc, partial_stats, splits, rows_per_split, heads, head_dim, out_stride,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program = one (sequence, query head) row: merges the splits' softmax partials (each accumulator is
    relative to its own row max) into the normalised output."""
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    partial = s.to(tl.int64) * rows_per_split + row
    row_max = tl.load(partial_stats + partial * 2, mask=s_ok, other=float("-inf"))
    row_sum = tl.load(partial_stats + partial * 2 + 1, mask=s_ok, other=0.0)
    top = tl.max(row_max, axis=0)
    weight = tl.where(
        row_max == float("-inf"), 0.0, tl.exp(row_max - tl.where(top == float("-inf"), 0.0, top))
    )
    acc = tl.load(partial_acc + partial[:, None] * head_dim + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)  # fmt: skip
    total = tl.sum(weight * row_sum, axis=0)
    result = tl.sum(weight[:, None] * acc, axis=0) / tl.maximum(total, 1e-30)
    sequence, h = row // heads, row % heads
    tl.store(out + sequence * out_stride + h * head_dim + d, result.to(out.dtype.element_ty), mask=d_ok)
