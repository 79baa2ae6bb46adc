"""How a split decode (flash-decoding) shares a prompt segment out, one rule for every device backend.

At batch 1 a decode step has one program per (request, KV head): 32 for Llama-2-7B, 8 for Llama-3-8B,
far too few to fill a GPU. Each pair's prompt columns are therefore split into chunks, one program per
chunk, and a combine kernel merges the chunks' softmax partials (docs/ops.md, segment_attention_decode).
"""

from __future__ import annotations


def split_prompt(
    pairs: int, columns: int, programs_to_fill: int, min_chunk: int, block: int
) -> tuple[int, int]:
    """(splits, chunk) for `pairs` (request, KV head) programs over `columns` prompt columns: split only
    as far as `programs_to_fill` programs in all, never into chunks below `min_chunk` columns, and each
    chunk a whole number of `block`-column tiles. Every split gets at least one column."""
    wanted = -(-programs_to_fill // max(pairs, 1))
    splits = max(1, min(wanted, columns // min_chunk))
    chunk = -(-max(columns, 1) // splits)
    chunk = -(-chunk // block) * block
    return -(-max(columns, 1) // chunk), chunk
