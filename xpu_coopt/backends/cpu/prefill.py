"""attention_prefill on the CPU: torch's scaled_dot_product_attention, causal or masked by query blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xpu_coopt.ops.calls import PrefillCall

# Query rows of a block of the CPU prefill's masked path (padding or a window). Each block attends only to
# the keys up to its last row and from its first row's window on, so the scores and the mask cover about
# half the P x P square causally, and a band of the window's width under a window. AVX2, 2 threads, 8
# heads of 128: P 4096 with a window of 1024, float32, 575 -> 157 ms (one block: 575); two rows of 2048
# with 1000 columns of padding, float32, 279 -> 154 ms; blocks of 128 and 512 were slower.
PREFILL_QUERY_BLOCK = 256


def attention_prefill(call: PrefillCall) -> None:
    out, seq_start, span, scale = call.out, call.seq_start, call.span, call.scale
    queries, columns = call.queries, call.columns
    offset = columns - queries  # query i sits at column offset + i
    # [B, heads, columns, D]
    q, k, v = call.query.transpose(1, 2), call.key.transpose(1, 2), call.value.transpose(1, 2)
    if offset == 0 and not bool(seq_start.any()) and span >= columns:
        # No padding, no window inside the prompt, a query at every column: plain causal attention, which
        # torch runs with its flash kernel (no mask tensor; its is_causal aligns the first query with the
        # first key, hence offset 0 only).
        result = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        out.copy_(result.transpose(1, 2))
        return
    column = torch.arange(columns, device=out.device)
    valid = column[None, :] >= seq_start[:, None].to(column.dtype)  # [B, columns]: keys, and queries too
    for first in range(0, queries, PREFILL_QUERY_BLOCK):
        last = min(first + PREFILL_QUERY_BLOCK, queries)
        query_columns = slice(offset + first, offset + last)
        keys = slice(max(0, offset + first - span + 1), offset + last)  # from the first query's window
        distance = column[query_columns, None] - column[None, keys]  # query column - key column
        causal = (distance >= 0) & (distance < span)  # the key is one of the query's last `span`
        # Padding rows have no key to attend to; let them see themselves so softmax stays finite, then
        # zero them.
        mask = (causal[None] & valid[:, None, keys]) | (distance == 0)[None]
        result = F.scaled_dot_product_attention(
            q[:, :, first:last], k[:, :, keys], v[:, :, keys], attn_mask=mask[:, None], scale=scale,
            enable_gqa=True,
        )  # fmt: skip
        out[:, first:last].copy_(result.transpose(1, 2) * valid[:, query_columns, None, None])
