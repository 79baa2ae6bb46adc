"""paged_attention's steps for a backend that gathers a sequence's K/V out of the pool of blocks and runs its
queries through attention_prefill over them (the CPU backend's prompt chunks; the SYCL and Triton
kernels read the blocks in place instead; docs/ops.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from xpu_coopt.ops import fp8
from xpu_coopt.ops.calls import PagedCall, PrefillCall

Prefill = Callable[[PrefillCall], None]


def sequences(call: PagedCall) -> Iterator[tuple[slice, int]]:
    """Each sequence's query rows and context length (read on the host once)."""
    starts, lengths = call.query_start.tolist(), call.context_lens.tolist()
    for index, context in enumerate(lengths):
        yield slice(starts[index], starts[index + 1]), context


def context_kv(call: PagedCall, index: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def prefill_sequence(
    call: PagedCall, rows: slice, keys: torch.Tensor, values: torch.Tensor, attention_prefill: Prefill
) -> None:
    """A sequence's queries (`rows`, the last columns of its context) attending over its keys and values
    [context, Hkv, D], through a backend's attention_prefill kernel."""
    start = call.query_start.new_zeros(1)
    attention_prefill(
        PrefillCall(
            call.out[rows][None],
            call.query[rows][None],
            keys[None],
            values[None],
            start,
            call.scale,
            call.span,
        )
    )
