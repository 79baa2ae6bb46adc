"""paged_attention on the CPU: each sequence's K/V gathered out of the pool's blocks head-major
(one copy, which for the engine's pool, stored [Hkv, blocks, block_size, D], is already each head's keys
in order); a decoding sequence (one query) attends with the CPU's attention of a few rows
(rows_attention.py) over its KV heads, each head's query group as rows of one matrix (no mask, no
padding, no GQA expansion); a prompt chunk runs attention_prefill over its gathered context.

Measured on 32 requests of 16-1241 prompt tokens, 64 new tokens each (the engine alone, SmolLM2
bfloat16, 2 threads): 15.9 s, against 46.4 s with the decoding sequences batched into float32 matmuls
over copies padded to the longest context (a decode step of 32 sequences 315 ms, now 165 ms) and 25.3 s
with that batching in groups of 8 of similar lengths.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from xpu_coopt.backends.cpu.prefill import attention_prefill
from xpu_coopt.backends.cpu.rows_attention import attend_rows
from xpu_coopt.ops import fp8
from xpu_coopt.ops.calls import PagedCall, PrefillCall


def paged_attention(call: PagedCall) -> None:
    query, out = call.query, call.out
    heads, dim = query.shape[1], query.shape[2]
    kv_heads = call.pool[0].shape[1]
    for index, (rows, context) in enumerate(_sequences(call)):
        count = rows.stop - rows.start
        if count == 0:
            continue
        keys, values = _context_kv(call, index, context)  # [Hkv, context, D]
        if count > 1:
            _prefill_sequence(call, rows, keys.transpose(0, 1), values.transpose(0, 1))
            continue
        first = max(0, context - call.span)  # a window keeps the query's last `span` keys
        q = query[rows.start].view(1, kv_heads, heads // kv_heads, dim)
        result, _ = attend_rows(q, keys[None, :, first:], values[None, :, first:], call.scale)
        out[rows.start].copy_(result.view(heads, dim))


def _sequences(call: PagedCall) -> Iterator[tuple[slice, int]]:
    """Each sequence's query rows and context length (read on the host once)."""
    starts, lengths = call.query_start.tolist(), call.context_lens.tolist()
    for index, context in enumerate(lengths):
        yield slice(starts[index], starts[index + 1]), context


def _context_kv(call: PagedCall, index: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence `index`'s K and V, each [Hkv, context, D] in the activation dtype. A pool stored
    head-major (the engine's, engine/kv_pool.py) gathers them in one copy that is already each head's
    keys in order; any other layout takes the same single copy out of strided memory."""
    blocks = -(-context // call.block_size)
    table = call.block_tables[index, :blocks].long()
    k_pool, v_pool, k_scale, v_scale = call.pool
    return tuple(
        _gathered(pool, scale, table, context, call.kv_dtype, call.query.dtype)
        for pool, scale in ((k_pool, k_scale), (v_pool, v_scale))
    )


def _gathered(pool, scale, table, context: int, kv_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    stored = pool.transpose(0, 1)  # [Hkv, blocks, block_size, D]
    cells = stored.index_select(1, table).reshape(stored.shape[0], -1, stored.shape[3])[:, :context]
    if scale is None:
        return cells
    scales = scale.transpose(0, 1).index_select(1, table).reshape(scale.shape[1], -1)[:, :context]
    return fp8.decode(cells, scales, kv_dtype, dtype)


def _prefill_sequence(call: PagedCall, rows: slice, keys: torch.Tensor, values: torch.Tensor) -> None:
    """A sequence's queries (`rows`, the last columns of its context) attending over its keys and values
    [context, Hkv, D], through attention_prefill."""
    start = call.query_start.new_zeros(1)
    attention_prefill(
        PrefillCall(call.out[rows][None], call.query[rows][None], keys[None], values[None], start, call.scale,
                    call.span)
    )  # fmt: skip
