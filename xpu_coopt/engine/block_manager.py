"""The KV pool's blocks: a free list and, per sequence, the blocks that hold its tokens in order.

A sequence's token at position p lives in block table[p // block_size], cell p % block_size. Blocks are
taken from the free list as a sequence grows (no allocation of memory: the pool is preallocated) and
returned when it ends or is preempted.
"""

from __future__ import annotations


class PoolExhausted(Exception):
    """No free block is left for a sequence that needs one (the scheduler preempts, then retries)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"a KV pool needs at least one block of one token, got {num_blocks} x {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self.tables: dict[int, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def missing_blocks(self, sequence_id: int, tokens: int) -> int:
        """Blocks a sequence must still be given to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(sequence_id, ())))

    def grow(self, sequence_id: int, tokens: int) -> list[int]:
        """Gives the sequence blocks until it holds `tokens` tokens; PoolExhausted (nothing taken) if the
        pool has too few free. Returns its block table."""
        missing = self.missing_blocks(sequence_id, tokens)
        if missing > len(self._free):
            raise PoolExhausted(f"{missing} blocks needed, {len(self._free)} free")
        table = self.tables.setdefault(sequence_id, [])
        table.extend(self._free.pop() for _ in range(missing))
        return table

    def release(self, sequence_id: int) -> None:
        """Returns the sequence's blocks to the free list (none: nothing to do)."""
        self._free.extend(reversed(self.tables.pop(sequence_id, [])))
