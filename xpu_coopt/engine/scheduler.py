"""Which sequences run in the next step, and on how many of their tokens.

Each step has a budget of tokens (max_num_batched_tokens) and of sequences (max_num_seqs). Running
sequences come first, oldest first: a decoding one takes one token, one still in its prompt takes the
next chunk of it that fits the budget (chunked prefill: a long prompt never stalls the others). Waiting
requests are then admitted, oldest first, while budget and free blocks remain, each starting after the
prefix the pool holds already (block_manager.py: prefix caching). A running sequence that
needs a block when none is free preempts the newest running one (its blocks freed, itself requeued to
recompute its tokens: vLLM's recompute preemption), never failing or deadlocking.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from xpu_coopt.engine.block_manager import BlockManager, PoolExhausted
from xpu_coopt.engine.request import Sequence, Status


def check_fits(prompt_tokens: int, max_tokens: int, num_blocks: int, block_size: int) -> None:
    """ValueError if a pool of num_blocks could not hold such a request even alone."""
    needed = -(-(prompt_tokens + max_tokens) // block_size)
    if needed > num_blocks:
        raise ValueError(
            f"a prompt of {prompt_tokens} tokens with max_tokens={max_tokens} needs {needed} KV blocks of "
            f"{block_size} tokens; the pool holds {num_blocks}"
        )


@dataclass(frozen=True)
class Scheduled:
    """A sequence and the number of its tokens computed this step (from sequence.computed on)."""

    sequence: Sequence
    tokens: int


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) and max_num_seqs ({max_num_seqs}) must be "
                "at least 1"
            )
        self.blocks = blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.reused_tokens = 0  # prompt tokens admitted sequences took from the prefix cache

    def add(self, sequence: Sequence) -> None:
        """Queues a sequence; ValueError if the pool could not hold it even alone."""
        check_fits(
            len(sequence.prompt_ids),
            sequence.params.max_tokens,
            self.blocks.num_blocks,
            self.blocks.block_size,
        )
        self.waiting.append(sequence)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        """The next step's sequences and token counts (empty only when nothing waits or runs)."""
        budget = self.max_num_batched_tokens
        scheduled: list[Scheduled] = []
        for sequence in list(self.running):
            if sequence not in self.running or budget == 0:
                continue  # preempted by an older sequence this step, or no budget left
            tokens = min(sequence.pending, budget)
            if not self._grow_running(sequence, tokens):
                continue  # it preempted itself
            scheduled.append(Scheduled(sequence, tokens))
            budget -= tokens
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            sequence = self.waiting[0]
            if sequence.computed == 0:  # a new or preempted sequence: its cached prefix is not computed again
                sequence.computed = self.blocks.reuse_prefix(sequence.id, sequence.token_ids)
            tokens = min(sequence.pending, budget)
            try:
                self.blocks.grow(sequence.id, sequence.computed + tokens)
            except PoolExhausted:
                self.blocks.release(sequence.id)  # the prefix it took, until it is admitted
                sequence.computed = 0
                break  # admitted once running ones end
            self.waiting.popleft()
            self.reused_tokens += sequence.computed
            sequence.status = Status.RUNNING
            self.running.append(sequence)
            scheduled.append(Scheduled(sequence, tokens))
            budget -= tokens
        return scheduled

    def _grow_running(self, sequence: Sequence, tokens: int) -> bool:
        """Blocks for the sequence's next `tokens`, preempting the newest running sequences for them;
        False where it had to preempt itself."""
        while True:
            try:
                self.blocks.grow(sequence.id, sequence.computed + tokens)
                return True
            except PoolExhausted:
                victim = self.running[-1]
                self.preempt(victim)
                if victim is sequence:
                    return False

    def preempt(self, sequence: Sequence) -> None:
        """Frees a running sequence's blocks and requeues it first, to recompute its tokens."""
        self.running.remove(sequence)
        self.blocks.release(sequence.id)
        sequence.computed = 0
        sequence.status = Status.WAITING
        self.waiting.appendleft(sequence)
        self.preemptions += 1

    def retire(self, sequence: Sequence) -> None:
        """A finished (or aborted) sequence leaves; its blocks go back to the pool."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.blocks.release(sequence.id)
