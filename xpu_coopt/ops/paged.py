"""paged_attention's shared steps: a sequence's K/V read out of the pool of blocks, and the op composed from
a backend's attention_prefill kernel, one call a sequence (what the SYCL and Triton backends run until
they have a kernel that reads the blocks in place; docs/ops.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from xpu_coopt.ops import fp8
from xpu_coopt.ops.calls import PagedCall, PrefillCall


def sequences(call: PagedCall) -> Iterator[tuple[slice, int]]:
    """Each sequence's query rows and context length (read on the host once)."""
    starts, lengths = call.query_start.tolist(), call.context_lens.tolist()
    for index, context in enumerate(lengths):
        yield slice(starts[index], starts[index + 1]), context


def context_kv(call: PagedCall, index: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence `index`'s K and V [context, Hkv, D] in the activation dtype, gathered block by block."""
    blocks = -(-context // call.block_size)
    table = call.block_tables[index, :blocks].long()
    k_pool, v_pool, k_scale, v_scale = call.pool
    return tuple(
        _gathered(pool, scale, table, context, call.kv_dtype, call.query.dtype)
        for pool, scale in ((k_pool, k_scale), (v_pool, v_scale))
    )


def _gathered(pool, scale, table, context: int, kv_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    cells = pool.index_select(0, table).transpose(1, 2)  # [blocks, block_size, Hkv, D]
    # contiguous: one block's reshape is a view whose heads are block_size * D apart, and the device
    # kernels take K/V with heads D apart (attention_prefill's layout)
    cells = cells.reshape(-1, *cells.shape[2:])[:context].contiguous()
    if scale is None:
        return cells
    scales = scale.index_select(0, table).transpose(1, 2).reshape(-1, scale.shape[1])[:context]
    return fp8.decode(cells, scales, kv_dtype, dtype)


def compose_by_prefill(call: PagedCall, attention_prefill: Callable[[PrefillCall], None]) -> None:
    """paged_attention as one attention_prefill a sequence over its gathered K/V (its queries the last
    columns of its context)."""
    start = torch.zeros(1, dtype=torch.int32, device=call.query.device)
    for index, (rows, context) in enumerate(sequences(call)):
        if rows.start == rows.stop:
            continue
        keys, values = context_kv(call, index, context)
        attention_prefill(
            PrefillCall(call.out[rows][None], call.query[rows][None], keys[None], values[None], start, call.scale,
                        call.span)
        )  # fmt: skip
