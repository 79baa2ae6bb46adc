"""The KV pool's blocks: a free list and, per sequence, the blocks that hold its tokens in order.

A sequence's token at position p lives in block table[p // block_size], cell p % block_size. Blocks are
taken from the free list as a sequence grows (no allocation of memory: the pool is preallocated) and
returned when it ends or is preempted.

Prefix caching (vLLM's automatic prefix caching): a full block is named by a hash of its tokens and of
every token before it (its parent block's hash), so two sequences that start alike name their first
blocks alike. A new sequence takes the blocks of its longest named prefix instead of computing them,
counted by references; a block nobody holds goes back to the free list still named, reused by the next
sequence that needs it, or given to one that needs any block, the least recently freed first (its name
then forgotten).
"""

from __future__ import annotations

from collections import OrderedDict


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
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(
            range(num_blocks)
        )  # least recently freed first
        self._references = [0] * num_blocks
        self._named: dict[int, int] = {}  # a full block's hash -> the block holding it
        self._name_of: dict[int, int] = {}  # block -> its hash
        self.tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[int]] = {}  # a sequence's full blocks' hashes, in order

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
        for _ in range(missing):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._references[block] = 1
            table.append(block)
        return table

    def reuse_prefix(self, sequence_id: int, token_ids: list[int]) -> int:
        """Gives a sequence without blocks the named blocks of its longest cached prefix; returns how many
        of its tokens they hold. The block of its last token is never taken (that token is computed, for
        its logits, into a block of its own)."""
        if sequence_id in self.tables:
            return 0
        table, hashes = [], []
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            name = _name(hashes[-1] if hashes else None, token_ids[start : start + self.block_size])
            block = self._named.get(name)
            if block is None:
                break
            table.append(block)
            hashes.append(name)
        for block in table:
            self._free.pop(block, None)
            self._references[block] += 1
        self.tables[sequence_id], self._hashes[sequence_id] = table, hashes
        return len(table) * self.block_size

    def name_full_blocks(self, sequence_id: int, token_ids: list[int], computed: int) -> None:
        """Names the sequence's blocks that are full of computed tokens, for later sequences to reuse."""
        hashes = self._hashes.setdefault(sequence_id, [])
        table = self.tables.get(sequence_id, [])
        for index in range(len(hashes), min(computed // self.block_size, len(table))):
            start = index * self.block_size
            name = _name(hashes[-1] if hashes else None, token_ids[start : start + self.block_size])
            hashes.append(name)
            block = table[index]
            if name not in self._named and block not in self._name_of:
                self._named[name], self._name_of[block] = block, name

    def release(self, sequence_id: int) -> None:
        """Drops the sequence's references; blocks nobody holds go back to the free list (their names kept)."""
        self._hashes.pop(sequence_id, None)
        for block in self.tables.pop(sequence_id, []):
            self._references[block] -= 1
            if self._references[block] == 0:
                self._free[block] = None

    def _forget(self, block: int) -> None:
        name = self._name_of.pop(block, None)
        if name is not None:
            del self._named[name]


def _name(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))
