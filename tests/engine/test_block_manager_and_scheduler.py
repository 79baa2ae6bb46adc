"""The engine's block manager and scheduler on their own: block accounting, the token budget, chunked
prefill, preemption order and the rejection of a request the pool cannot hold."""

from __future__ import annotations

import pytest

from xpu_coopt.engine.block_manager import BlockManager, PoolExhausted
from xpu_coopt.engine.request import SamplingParams, Sequence, Status
from xpu_coopt.engine.scheduler import Scheduler


def _sequence(index: int, prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(index, list(range(prompt)), SamplingParams(max_tokens=max_tokens), frozenset())


def test_blocks_are_given_as_sequences_grow_and_taken_back():
    blocks = BlockManager(num_blocks=5, block_size=4)
    assert blocks.grow(0, 5) == [0, 1] and blocks.grow(0, 8) == [0, 1] and blocks.grow(1, 1) == [2]
    assert blocks.free_blocks == 2 and blocks.used_blocks == 3
    with pytest.raises(PoolExhausted):
        blocks.grow(1, 13)  # 4 blocks: 3 more, 2 free
    assert blocks.tables[1] == [2] and blocks.free_blocks == 2  # nothing taken by the failed grow
    blocks.release(0)
    assert blocks.free_blocks == 4 and blocks.grow(1, 13) == [2, 3, 4, 0]  # the least recently freed first
    blocks.release(1)
    blocks.release(7)  # a sequence without blocks: nothing to do
    assert blocks.free_blocks == 5


def test_running_sequences_go_first_and_long_prompts_in_chunks_of_the_budget():
    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=10, max_num_seqs=8)
    first, second, third = _sequence(0, 3), _sequence(1, 25), _sequence(2, 6)
    for sequence in (first, second, third):
        scheduler.add(sequence)
    step = scheduler.schedule()
    assert [(s.sequence.id, s.tokens) for s in step] == [(0, 3), (1, 7)]  # the budget ends inside the prompt
    first.computed, second.computed = 3, 7
    first.output_ids.append(5)  # first decodes from now on
    step = scheduler.schedule()
    assert [(s.sequence.id, s.tokens) for s in step] == [(0, 1), (1, 9)]  # third waits for budget
    assert third.status is Status.WAITING


def test_out_of_blocks_the_newest_running_sequence_is_preempted_and_recomputed_later():
    blocks = BlockManager(4, 4)
    scheduler = Scheduler(blocks, max_num_batched_tokens=64, max_num_seqs=8)
    old, new = _sequence(0, 8), _sequence(1, 8)
    scheduler.add(old)
    scheduler.add(new)
    assert [s.sequence.id for s in scheduler.schedule()] == [0, 1] and blocks.free_blocks == 0
    old.computed = new.computed = 8
    old.output_ids.append(1)
    new.output_ids.append(1)
    step = scheduler.schedule()  # old needs a third block: new is preempted for it
    assert [(s.sequence.id, s.tokens) for s in step] == [(0, 1)]
    assert scheduler.preemptions == 1 and new.status is Status.WAITING and new.computed == 0
    assert list(scheduler.waiting) == [new] and blocks.tables[0] == [0, 1, 2]


def test_the_newest_sequence_in_need_preempts_itself_and_the_older_runs_on():
    blocks = BlockManager(4, 4)
    scheduler = Scheduler(blocks, max_num_batched_tokens=64, max_num_seqs=8)
    old, new = _sequence(0, 7), _sequence(1, 8)
    for sequence in (old, new):
        scheduler.add(sequence)
    scheduler.schedule()
    for sequence in (old, new):
        sequence.computed = sequence.length
        sequence.output_ids.append(1)
    step = scheduler.schedule()  # old's 8th token fits its 2 blocks; new's 9th needs a third
    assert [(s.sequence.id, s.tokens) for s in step] == [(0, 1)]
    assert new.status is Status.WAITING and blocks.free_blocks == 2 and scheduler.preemptions == 1


def test_a_request_the_pool_cannot_hold_alone_is_rejected():
    scheduler = Scheduler(BlockManager(4, 4), max_num_batched_tokens=8, max_num_seqs=2)
    with pytest.raises(
        ValueError,
        match=r"a prompt of 15 tokens with max_tokens=4 needs 5 KV blocks of 4 tokens; the pool holds 4",
    ):
        scheduler.add(_sequence(0, 15))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_tokens=0), "max_tokens=0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_p=0.0), "top_p=0.0"),
    ],
)
def test_bad_sampling_params_are_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_prompt_reuses_the_named_blocks_of_its_cached_prefix_counted_by_references():
    blocks = BlockManager(num_blocks=8, block_size=4)
    first = list(range(100, 111))  # 11 tokens: blocks 0, 1 full, block 2 partly
    blocks.grow(0, len(first))
    blocks.name_full_blocks(0, first, computed=11)
    second = [*first[:8], 7, 7, 7]  # the same two first blocks, then its own
    assert blocks.reuse_prefix(1, second) == 8 and blocks.tables[1] == [0, 1]
    assert blocks.grow(1, 11) == [0, 1, 3] and blocks.free_blocks == 4
    blocks.release(
        0
    )  # blocks 0 and 1 stay with sequence 1; block 2 is free again, still named? no: half full
    assert blocks.free_blocks == 5
    blocks.release(1)  # all free now, blocks 0 and 1 still named
    assert blocks.free_blocks == 8 and blocks.reuse_prefix(2, first) == 8
    assert blocks.reuse_prefix(3, [*first[:8], 1]) == 8  # two sequences may hold one block
    assert blocks.reuse_prefix(4, first[:4]) == 0  # the last token's block is computed, never taken


def test_a_named_block_given_to_another_sequence_loses_its_name():
    blocks = BlockManager(num_blocks=2, block_size=2)
    tokens = [1, 2, 3]
    blocks.grow(0, 3)
    blocks.name_full_blocks(0, tokens, computed=3)
    blocks.release(0)
    blocks.grow(1, 4)  # takes both blocks, the named one among them
    blocks.release(1)
    assert blocks.reuse_prefix(2, tokens) == 0
