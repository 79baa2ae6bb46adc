"""One engine step's ragged batch, as the decoder's cache: sequences with one token (decoding) or a chunk
of their prompt, flattened into one row of T tokens.

The pool is a KVStorage whose rows are blocks and whose columns are a block's cells (storage.py's
[rows, Hkv, columns, D] layout), so rotary_embedding_kv_write writes each token's K/V to its (block,
cell) as it does for the paged prompt segment. Attention reads the cells back: the decoding sequences
(one query each) in one attention_prefill call over their contexts gathered left-padded to the longest
(its seq_start skips the padding), each sequence with a prompt chunk in a call of its own (its chunk's
queries are the last columns of its context, causal within the chunk). A single op over the ragged
batch, reading the blocks in place (docs/ops.md, issue 38), is left to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xpu_coopt.cache.storage import KVStorage
from xpu_coopt.engine.scheduler import Scheduled
from xpu_coopt.ops import Ops, fp8


@dataclass(frozen=True)
class _Span:
    """A sequence's tokens in the step: rows first..first + length of the flattened batch, attending over
    `cells` (block rows, cell columns) of its whole context."""

    first: int
    length: int
    cells: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _DecodeGroup:
    """The decoding sequences of a step: their rows in the batch, and their contexts' cells [S, P]
    left-padded to the longest P (padding repeats a sequence's first cell; seq_start skips it)."""

    rows: torch.Tensor
    cells: tuple[torch.Tensor, torch.Tensor]
    seq_start: torch.Tensor

    @staticmethod
    def of(spans: list[_Span], device: torch.device) -> _DecodeGroup | None:
        if not spans:
            return None
        longest = max(span.cells[0].shape[0] for span in spans)
        padded = [
            [
                torch.cat((cells[:1].expand(longest - cells.shape[0]), cells))
                for span in spans
                for cells in (span.cells[i],)
            ]
            for i in range(2)
        ]
        starts = [longest - span.cells[0].shape[0] for span in spans]
        return _DecodeGroup(
            torch.tensor([span.first for span in spans], device=device),
            (torch.stack(padded[0]), torch.stack(padded[1])),
            torch.tensor(starts, dtype=torch.int32, device=device),
        )


class StepBatch:
    """What the decoder's attention needs for one step (cache/attention.py dispatches to attend())."""

    def __init__(self, scheduled: list[Scheduled], tables: dict[int, list[int]], pool: KVStorage, block_size: int,
                 kv_dtype: str, dtype: torch.dtype, windows: tuple[int, ...], scale: float) -> None:  # fmt: skip
        device = pool[0].k.device
        self.pool, self.kv_dtype, self.dtype, self.windows, self.scale = pool, kv_dtype, dtype, windows, scale
        tokens, positions, spans = [], [], []
        for item in scheduled:
            sequence, first = item.sequence, item.sequence.computed
            tokens += sequence.token_ids[first : first + item.tokens]
            positions += range(first, first + item.tokens)
            context = torch.arange(first + item.tokens)
            table = torch.tensor(tables[sequence.id], dtype=torch.int64)
            cells = (table[context // block_size].to(device), (context % block_size).to(device))
            spans.append(_Span(len(tokens) - item.tokens, item.tokens, cells))
        self.input_ids = torch.tensor([tokens], dtype=torch.int64, device=device)
        self.positions = torch.tensor([positions], dtype=torch.int64, device=device)
        self.spans = spans
        # each token's cell: the last `length` of its sequence's cells
        self.write_cells = tuple(
            torch.cat([span.cells[i][-span.length :] for span in spans]) for i in range(2)
        )
        # the flattened row of each sequence's last token, whose logits sample its next token
        self.last_rows = torch.tensor([span.first + span.length - 1 for span in spans], device=device)
        self.seq_start = torch.zeros(1, dtype=torch.int32, device=device)
        self.chunks = [span for span in spans if span.length > 1]
        self.decodes = _DecodeGroup.of([span for span in spans if span.length == 1], device)

    def attend(self, ops: Ops, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               cos_sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Rotates and writes the step's K/V into the pool, then each sequence attends over its cells."""
        kv = self.pool[layer]
        ops.kernels.rotary_embedding_kv_write(
            query, key, value, cos_sin, *kv, *self.write_cells, self.kv_dtype
        )
        out = torch.empty_like(query)
        for span in self.chunks:
            keys, values = self._context(kv, *span.cells)
            ops.kernels.attention_prefill(
                out[span.first : span.first + span.length].unsqueeze(0),
                query[span.first : span.first + span.length].unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                self.seq_start, self.scale, self.windows[layer],
            )  # fmt: skip
        group = self.decodes
        if group is not None:
            keys, values = self._context(kv, *group.cells)
            decoded = query.new_empty((group.rows.shape[0], 1, *query.shape[1:]))
            ops.kernels.attention_prefill(
                decoded, query[group.rows].unsqueeze(1), keys, values, group.seq_start, self.scale,
                self.windows[layer],
            )  # fmt: skip
            out[group.rows] = decoded[:, 0]
        return out.view(query.shape[0], -1)

    def _context(self, kv, rows: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of cells (rows, columns) [..., Hkv, D] in the activation dtype (FP8 codes decoded)."""
        return tuple(
            cells[rows, :, columns]
            if scale is None
            else fp8.decode(cells[rows, :, columns], scale[rows, :, columns], self.kv_dtype, self.dtype)
            for cells, scale in ((kv.k, kv.k_scale), (kv.v, kv.v_scale))
        )
