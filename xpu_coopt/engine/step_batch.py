"""One engine step's ragged batch, as the decoder's cache: sequences with one token (decoding) or a chunk
of their prompt, flattened into one row of T tokens.

The pool is a KVStorage whose rows are blocks and whose columns are a block's cells (storage.py's
[rows, Hkv, columns, D] layout), so rotary_embedding_kv_write writes each token's K/V to its (block,
cell) as it does for the paged prompt segment, and paged_attention (docs/ops.md) attends each sequence's
queries over its blocks.
"""

from __future__ import annotations

import torch

from xpu_coopt.cache.storage import KVStorage
from xpu_coopt.engine.scheduler import Scheduled
from xpu_coopt.ops import Ops


class StepBatch:
    """What the decoder's attention needs for one step (cache/attention.py dispatches to attend())."""

    def __init__(self, scheduled: list[Scheduled], tables: dict[int, list[int]], pool: KVStorage, block_size: int,
                 kv_dtype: str, windows: tuple[int, ...], scale: float) -> None:  # fmt: skip
        device = pool[0].k.device
        self.pool, self.kv_dtype, self.windows, self.scale = pool, kv_dtype, windows, scale
        tokens, positions, counts, contexts = [], [], [], []
        for item in scheduled:
            sequence, first = item.sequence, item.sequence.computed
            tokens += sequence.token_ids[first : first + item.tokens]
            positions += range(first, first + item.tokens)
            counts.append(item.tokens)
            contexts.append(first + item.tokens)
        width = max(-(-context // block_size) for context in contexts)
        # each sequence holds exactly the blocks of its context: padded to the widest with block 0 (not read)
        table_rows = [
            tables[item.sequence.id] + [0] * (width - len(tables[item.sequence.id])) for item in scheduled
        ]
        self.block_tables = torch.tensor(table_rows, dtype=torch.int32, device=device)
        self.query_start = torch.tensor(
            [0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device
        )
        self.context_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
        position_tensor = torch.tensor(positions, dtype=torch.int64)
        sequence_of_token = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        rows = torch.tensor(table_rows, dtype=torch.int64)[sequence_of_token, position_tensor // block_size]
        self.write_cells = (rows.to(device), (position_tensor % block_size).to(device))
        self.input_ids = torch.tensor([tokens], dtype=torch.int64, device=device)
        self.positions = position_tensor.to(device)[None]
        # the flattened row of each sequence's last token, whose logits sample its next token
        self.last_rows = self.query_start[1:].long() - 1

    def attend(self, ops: Ops, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               cos_sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Rotates and writes the step's K/V into the pool, then each sequence attends over its blocks."""
        kv = self.pool[layer]
        ops.kernels.rotary_embedding_kv_write(
            query, key, value, cos_sin, *kv, *self.write_cells, self.kv_dtype
        )
        out = torch.empty_like(query)
        ops.kernels.paged_attention(
            out, query, *kv, self.block_tables, self.query_start, self.context_lens, self.scale, self.kv_dtype,
            self.windows[layer],
        )  # fmt: skip
        return out.view(query.shape[0], -1)
