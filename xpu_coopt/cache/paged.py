"""Paged KV cache (Opt-Pa): the segment cache with its prompt segment in blocks, allocated as needed.

The segment cache gives every request of a batch a prompt segment as long as the longest prompt (left
padding included) and, with one beam per request, room for all max_new_tokens, allocated up front. This
cache keeps the same two segments, but the prompt segment (with one beam, the prompt and its response)
is a pool of blocks of BLOCK_SIZE columns, shared by the batch, with a table per request:

    prompt_k, prompt_v  [L, N, Hkv, BLOCK_SIZE, D]  block n of the pool (scales: without D)
    block_table         [R, columns / BLOCK_SIZE] int32: block_table[r, b] = the block that holds request
                        r's columns b * BLOCK_SIZE ... (b + 1) * BLOCK_SIZE - 1

- A block of left padding alone is never allocated: a batch of unequal prompts stores each at its own
  length, rounded up to a block.
- Blocks for generated tokens are allocated as the tokens arrive: a generation that stops early (EOS,
  stop strings) never allocates the rest. The pool grows by at least a quarter (a copy of it) when it runs
  out, never past what the rest of the generation can use.
- Block 0 is a sink: prefill writes every column of the left-padded batch, and the padding's columns
  that have no block of their own are written there. It is never read.
- Sliding windows (a window on every layer, as Mistral's): the segment cache's rule keeps only the
  prompt's last window - 1 columns; later, a block whose columns all lie before the window of the token
  being written is never read again (segment_attention_decode reads no column before a window), so a
  request's next block is its oldest such block, where it has one. A one-beam generation then holds
  about a window's blocks, however long its prompt and however long it runs.

The response segment of beam search stays per beam, as in the segment cache. Decode attention reads the
prompt segment through the table (segment_attention_decode's prompt_block_table, docs/ops.md).
With device lengths (a CUDA graph replaying the decode step) the pool grows the same way: each growth
moves it, and the decode graph is captured again at that step (xpu_coopt.cache.decode_graph).
"""

from __future__ import annotations

import torch

from xpu_coopt.cache.segment import RESPONSE_STEP, SegmentKVCache, extend

BLOCK_SIZE = 16  # columns a block holds: a multiple of the SYCL kernel's 16-column tiles (docs/ops.md)
POOL_GROWTH = 4  # a pool that runs out grows by at least 1/POOL_GROWTH of its blocks
POOL_NAMES = ("prompt_k", "prompt_v", "prompt_k_scale", "prompt_v_scale")


class PagedKVCache(SegmentKVCache):
    def _allocate_prompt_segment(self, columns: int, storage: torch.dtype) -> None:
        """The block table with room for `columns` columns per request, and a pool of the sink block alone:
        _new_prompt() allocates the prompt's blocks."""
        device = self.prompt_start.device
        self.block_table = torch.zeros(
            (self.num_requests, -(-columns // BLOCK_SIZE)), dtype=torch.int32, device=device
        )
        spec = self.spec
        shape = (spec.num_layers, 1, spec.num_kv_heads, BLOCK_SIZE, spec.head_dim)
        self.prompt_k = torch.zeros(shape, dtype=storage, device=device)
        self.prompt_v = torch.zeros(shape, dtype=storage, device=device)
        self.prompt_k_scale, self.prompt_v_scale = self._scales(shape)
        self.blocks_used = 1  # the sink
        # Columns of the table mapped so far: the same for every request, whose columns advance together.
        self.mapped_blocks = 0

    def _held_columns(self, columns: int) -> int:
        """Every column has its entry in the table (no ring): the window lets go of blocks instead."""
        return columns

    def prompt_capacity(self) -> int:
        return self.block_table.shape[1] * BLOCK_SIZE

    def pool_blocks(self) -> int:
        """Blocks the pool holds (the sink included)."""
        return self.prompt_k.shape[1]

    def _most_blocks(self) -> int:
        """Blocks this generation can come to use: those in use, and one per request for each column of
        the table that is not mapped yet."""
        return self.blocks_used + self.num_requests * (self.block_table.shape[1] - self.mapped_blocks)

    def _reserve(self, blocks: int) -> None:
        """Makes the pool hold at least `blocks` blocks (a copy of it), growing it by at least a quarter
        (fewer copies) but not past what this generation can come to use."""
        held = self.pool_blocks()
        if blocks <= held:
            return
        target = max(blocks, min(self._most_blocks(), held + -(-held // POOL_GROWTH)))
        for name in POOL_NAMES:
            setattr(self, name, extend(getattr(self, name), 1, target - held))

    def _new_prompt(self, prompt_len: int) -> None:
        """Maps a block to every block-sized piece of each prompt that holds a column of it (left padding
        alone takes none), and routes the prefill's writes through the table."""
        super()._new_prompt(prompt_len)
        prompt_blocks = -(-self.kept_columns // BLOCK_SIZE)
        first = self.kept_start.cpu().long() // BLOCK_SIZE  # one wait for the device, at prefill
        mapped = torch.arange(self.block_table.shape[1])[None, :] >= first[:, None]
        mapped[:, prompt_blocks:] = False
        # Blocks 1, 2, ... in row order; 0 (the sink) where unmapped.
        table = torch.cumsum(mapped.flatten(), 0).view(mapped.shape) * mapped
        self.blocks_used, self.mapped_blocks = 1 + int(mapped.sum()), prompt_blocks
        self._first_blocks = first  # each request's first mapped table column, on the host
        self._first_blocks_on_device = first.to(self.block_table.device)
        self._next_reused = 0  # the table column whose blocks are reused next
        self._reserve(self.blocks_used)
        self.block_table.copy_(table)  # in place: a decode graph reads the table
        rows = self.block_table[self._prompt_rows, self._prompt_columns // BLOCK_SIZE].long()
        self._prompt_rows, self._prompt_columns = rows, self._prompt_columns % BLOCK_SIZE

    def _request_cells(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Through the table; None once a window has handed a block of the request's on (_next_blocks)."""
        if self._next_reused:
            return None
        columns = torch.arange(first, first + count, device=self.block_table.device)
        return self.block_table[0, columns // BLOCK_SIZE].long(), columns % BLOCK_SIZE

    def use_device_lengths(self) -> None:
        super().use_device_lengths()
        self._decode_rows = self._seq_rows.clone()  # updated in place from now on

    def _write_column(self, step: int) -> int:
        """With one beam, the token goes to the request's block for its column, a new block where the
        column starts one; each request starts a block at the same step (the prompts are left-padded)."""
        column = super()._write_column(step)
        if not self.single_beam:
            return column
        block, offset = divmod(column, BLOCK_SIZE)
        if offset == 0 and block >= self.mapped_blocks:  # (a run of tokens may have mapped it already)
            self.block_table[:, block].copy_(self._next_blocks(column))
            self.mapped_blocks = block + 1
        rows = self.block_table[:, block].long()
        if self.segment_lens is None:
            self._decode_rows = rows
        else:
            self._decode_rows.copy_(rows)
        return offset

    def _next_blocks(self, column: int) -> torch.Tensor:
        """int32 [R]: a block for each request's table column starting at `column`. Where the window lets
        go of one, the blocks of the oldest column outside it (every cell before the window of the token
        at `column`, hence of every later one), and new ones for the requests whose column that was is
        padding alone (the shared sink); else new blocks. No wait for the device: a decode graph's
        bookkeeping is queued ahead of the step before it."""
        device = self.block_table.device
        expired = (column + 1 - self.common_window) // BLOCK_SIZE if self.common_window else 0
        if self._next_reused >= expired:
            self._reserve(self.blocks_used + self.num_requests)
            blocks = torch.arange(
                self.blocks_used, self.blocks_used + self.num_requests, dtype=torch.int32, device=device
            )
            self.blocks_used += self.num_requests
            return blocks
        reused = self._next_reused
        self._next_reused += 1
        new = int((self._first_blocks > reused).sum())
        self._reserve(self.blocks_used + new)
        padding_alone = self._first_blocks_on_device > reused
        new_blocks = (self.blocks_used - 1 + torch.cumsum(padding_alone, 0)).to(torch.int32)
        self.blocks_used += new
        return torch.where(padding_alone, new_blocks, self.block_table[:, reused])

    def _grow(self) -> None:
        if not self.single_beam:
            super()._grow()
            return
        extra = -(-RESPONSE_STEP // BLOCK_SIZE)  # table columns for RESPONSE_STEP more tokens
        self.block_table = extend(self.block_table, 1, extra)
        self.capacity = self._generated_room()
