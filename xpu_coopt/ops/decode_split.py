"""How a split decode (flash-decoding) shares a prompt segment out, one rule for every device backend.

At batch 1 a decode step has one program per (request, KV head): 32 for Llama-2-7B, 8 for Llama-3-8B,
far too few to fill a GPU. Each pair's prompt tiles are therefore shared out among several programs, and
a combine kernel merges their softmax partials (docs/ops.md, segment_attention_decode).
"""

from __future__ import annotations


def split_prompt(pairs: int, columns: int, programs_to_fill: int, min_chunk: int, block: int) -> int:
    """Splits for `pairs` (request, KV head) programs over `columns` prompt columns: split only as far as
    `programs_to_fill` programs in all, never into shares below `min_chunk` columns, and each share a
    whole number of `block`-column tiles, so that every split gets at least one tile. The kernels share
    out the tiles a step reads, after a request's padding, among the splits (on the device: a replayed
    graph's segment lengths are device values)."""
    wanted = -(-programs_to_fill // max(pairs, 1))
    splits = max(1, min(wanted, columns // min_chunk))
    tiles = -(-max(columns, 1) // block)
    tiles_per_split = -(-tiles // splits)
    return -(-tiles // tiles_per_split)  # those of the splits that get a tile
