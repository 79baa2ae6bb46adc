"""Paged prompt segment (Opt-Pa): each request's prompt-segment columns in blocks of a shared pool.

    pool: K, V [N, Hkv, BLOCK_SIZE, D] per layer     block n (scales: without D)
    block_table [R, columns / BLOCK_SIZE] int32       block_table[r, b] holds request r's columns
                                                      b * BLOCK_SIZE ... (b + 1) * BLOCK_SIZE - 1

- A block of left padding alone is never given: a batch of unequal prompts stores each at its own length,
  rounded up to a block. Block 0 is a sink: prefill writes every column of the left-padded batch, and
  the padding's columns that have no block of their own are written there. It is never read.
- The pool is sized when a generation's prompts are laid out (map_prompt), for every column it may come
  to hold (its max_new_tokens), and never grows while the generation runs: no copy of the pool, no single
  allocation past one layer's blocks (storage.py), and a captured decode graph keeps reading the same
  pool. Decoding past max_new_tokens (the forward API) grows it, a layer at a time.
- Sliding windows (a window on every layer, as Mistral's): a block whose columns all lie before the
  window of the token being written is never read again (segment_attention_decode reads no column
  before a window), so a request's next block is its oldest such block, where it has one (BlockPlan). A
  one-beam generation then holds about a window's blocks, however long its prompt and its response.
"""

from __future__ import annotations

import torch

from xpu_coopt.cache.storage import KVFormat, KVStorage
from xpu_coopt.cache.window import Window

BLOCK_SIZE = 16  # columns a block holds: a multiple of the SYCL kernel's 16-column tiles (docs/ops.md)


def blocks(columns: int) -> int:
    """Blocks that hold `columns` columns."""
    return -(-columns // BLOCK_SIZE)


class BlockPlan:
    """Which block holds each request's table column, decided on the host when the prompts are laid out.
    The prompts' blocks are numbered from 1 request by request (0 is the sink, for columns of padding
    alone); each later table column takes the blocks of the oldest column wholly before its window (new
    blocks for the requests whose column that was is padding alone), else a new block for each request."""

    def __init__(self, first: list[int], prompt_blocks: int, window: Window) -> None:
        self.first = first  # each request's first table column holding a column of its prompt
        self.window = window
        self.table = [[0] * prompt_blocks for _ in first]
        self.blocks = 1  # blocks in the plan, the sink included
        for row, start in zip(self.table, first, strict=True):
            for column in range(start, prompt_blocks):
                row[column] = self._new_block()
        self.next_reused = 0  # the table column whose blocks the next reuse takes
        self.first_reusing: int | None = None  # the first table column that took another's blocks

    def _new_block(self) -> int:
        self.blocks += 1
        return self.blocks - 1

    def extend(self, table_columns: int) -> None:
        """Plans the table's columns up to `table_columns`."""
        for column in range(len(self.table[0]), table_columns):
            self._plan_column(column)

    def _plan_column(self, column: int) -> None:
        span = self.window.span
        # table columns every cell of which lies before the window of this column's first token
        expired = (column * BLOCK_SIZE + 1 - span) // BLOCK_SIZE if span is not None else 0
        if self.next_reused >= expired:
            for row in self.table:
                row.append(self._new_block())
            return
        reused = self.next_reused
        self.next_reused += 1
        if self.first_reusing is None:
            self.first_reusing = column
        for row, start in zip(self.table, self.first, strict=True):
            row.append(self._new_block() if start > reused else row[reused])

    def reused_before(self, columns: int) -> bool:
        """Whether a table column holding one of a request's first `columns` columns took another's blocks."""
        return self.first_reusing is not None and blocks(columns) > self.first_reusing


class PagedPrompt:
    """The prompt segment in blocks (the module's docstring). new_tokens: whether the generated tokens
    follow the prompt in this segment (one beam), so that their columns are planned too."""

    def __init__(self, kv: KVFormat, requests: int, columns: int, window: Window, new_tokens: bool) -> None:
        self.kv = kv
        self.window = window
        self.new_tokens = new_tokens
        self.block_table = torch.zeros((requests, blocks(columns)), dtype=torch.int32, device=kv.device)
        self.storage: KVStorage = kv.allocate(1, BLOCK_SIZE)  # the sink; map_prompt() sizes the pool
        self.plan: BlockPlan | None = None

    def capacity(self) -> int:
        return self.block_table.shape[1] * BLOCK_SIZE

    def cells(self, columns: int) -> int:
        return columns  # every column has its entry in the table: the window lets go of blocks instead

    def is_ring(self) -> bool:
        return False

    def pool_blocks(self) -> int:
        """Blocks the pool holds (the sink included)."""
        return self.storage.rows

    def blocks_in_use(self, columns: int) -> int:
        """Blocks holding the requests' first `columns` columns, the sink included: the plan numbers blocks
        in the order their columns come, so these are the blocks up to the highest in those columns."""
        return int(self.block_table[:, : blocks(columns)].max()) + 1

    def map_prompt(self, kept_start: torch.Tensor, kept_columns: int, rows: torch.Tensor, columns: torch.Tensor,
                   plan_columns: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Plans the blocks (one wait for the device, for the prompts' starts), sizes the pool for them
        where it is smaller (a new cache's; a reset cache fits, planned_blocks()), fills the table in
        place (a decode graph reads it) and routes the prefill's writes through it."""
        first = (kept_start.cpu().long() // BLOCK_SIZE).tolist()
        self.plan = BlockPlan(first, blocks(kept_columns), self.window)
        if self.new_tokens:
            self.plan.extend(blocks(plan_columns))
        self._hold(self.plan.blocks)
        table = torch.tensor(self.plan.table, dtype=torch.int32)
        self.block_table.zero_()
        self.block_table[:, : table.shape[1]].copy_(table)
        rows = self.block_table[rows, columns // BLOCK_SIZE].long()
        return rows, columns % BLOCK_SIZE

    def planned_blocks(self, kept_start: torch.Tensor, kept_columns: int, plan_columns: int) -> int:
        """The blocks a generation laid out as map_prompt() would lay it out needs."""
        plan = BlockPlan((kept_start.cpu().long() // BLOCK_SIZE).tolist(), blocks(kept_columns), self.window)
        if self.new_tokens:
            plan.extend(blocks(plan_columns))
        return plan.blocks

    def _hold(self, pool_blocks: int) -> None:
        """A pool of at least `pool_blocks` blocks: a new one where it holds fewer (before a generation
        runs, so nothing is copied)."""
        if self.pool_blocks() < pool_blocks:
            self.storage = self.kv.allocate(pool_blocks, BLOCK_SIZE)

    def address(self, column: int) -> tuple[torch.Tensor, int]:
        block, offset = divmod(column, BLOCK_SIZE)
        return self.block_table[:, block].long(), offset

    def request_cells(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.plan.reused_before(first + count):
            return None  # a window has handed one of their blocks on
        columns = torch.arange(first, first + count, device=self.block_table.device)
        return self.block_table[0, columns // BLOCK_SIZE].long(), columns % BLOCK_SIZE

    def grow(self, columns: int) -> None:
        """Table columns for `columns` more columns a request, and their blocks in the pool (a copy of the
        pool, a layer at a time: only where a caller decodes past the max_new_tokens it asked for)."""
        extra = blocks(columns)
        self.block_table = torch.cat(
            (self.block_table, self.block_table.new_zeros((self.block_table.shape[0], extra))), 1
        )
        if not self.new_tokens:
            return
        planned = len(self.plan.table[0])
        self.plan.extend(planned + extra)
        self.storage.grow(0, self.plan.blocks - self.pool_blocks())
        new_columns = torch.tensor([row[planned:] for row in self.plan.table], dtype=torch.int32)
        self.block_table[:, planned : planned + extra].copy_(new_columns)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.storage.tensors(), self.block_table]
