"""How a decode step's attention work is shared out among programs, one rule for every device backend.

Split decode (flash-decoding): at batch 1 a decode step has one program per (request, KV head): 32 for
Llama-2-7B, 8 for Llama-3-8B, far too few to fill a GPU. Each pair's prompt tiles are therefore shared
out among several programs, and a combine kernel merges their softmax partials (docs/ops.md,
segment_attention_decode). Row chunks: a pair's query rows (beams x query heads per KV head) beyond what
one program holds are shared out among several, each attending to the whole segment.
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class RowChunks:
    """How a decode step's query rows of one (request, KV head) are shared out among programs: `rows` a
    program (`chunks` of them), spanning at most `beams` beams. Row i is beam i // group's query head
    i % group of the KV group."""

    rows: int
    chunks: int
    beams: int


def chunk_rows(beams: int, group: int, max_rows: int) -> RowChunks:
    """Rows for programs that serve at most `max_rows` each. One program where all beams x group rows fit,
    as in a greedy step or a beam search of a few beams; otherwise whole beams a program, as evenly as can
    be, so that each reads its beams' response rows; a KV group wider than max_rows (a model converted to
    MQA, say) is cut into equal runs of rows, which may span two beams."""
    total = beams * group
    if total <= max_rows:
        return RowChunks(total, 1, beams)
    if group <= max_rows:
        chunks = -(-beams // (max_rows // group))
        per_program = -(-beams // chunks)
        return RowChunks(per_program * group, -(-beams // per_program), per_program)
    chunks = -(-total // max_rows)
    rows = -(-total // chunks)
    spans = ((min(first + rows, total) - 1) // group - first // group + 1 for first in range(0, total, rows))
    return RowChunks(rows, chunks, max(spans))
