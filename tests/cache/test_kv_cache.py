"""The segment KV cache, both layouts: memory proportional to P + B*R, beam reorders that move no K/V,
growth, rings under a window, the paged pool's blocks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import CONFIGS, frequent_token, left_padded_prompts, tiny_model, transformers_logits

import xpu_coopt
from xpu_coopt.cache import BLOCK_SIZE, RESPONSE_STEP
from xpu_coopt.cache.paged import PagedPrompt
from xpu_coopt.kv_scales import KVScales
from xpu_coopt.model.optimized import prompt_layout


def test_kv_bytes_are_prompt_once_plus_response_per_beam():
    model = tiny_model("llama-gqa-8q2kv-d64")
    spec = xpu_coopt.optimize(model).spec
    requests, beams, prompt_len, new_tokens = 2, 4, 33, 16
    ids, mask = left_padded_prompts([prompt_len, 20], spec.vocab_size)
    _, cache = xpu_coopt.optimize(model).prefill(ids, mask, beams, new_tokens)  # a session over the cache
    capacity = -(-new_tokens // RESPONSE_STEP) * RESPONSE_STEP
    per_token = spec.kv_bytes_per_token(4)  # float32 K and V of every layer
    expected = (
        per_token * (requests * prompt_len + requests * beams * capacity) + requests * beams * capacity * 4
    )
    assert cache.nbytes() == expected
    per_beam_contiguous = per_token * requests * beams * (prompt_len + new_tokens)
    assert cache.nbytes() < 0.55 * per_beam_contiguous  # (33 + 4 * 16) / (4 * 49) plus the index


def test_reorder_moves_integers_not_kv():
    model = tiny_model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model)
    ids, mask = left_padded_prompts([7, 5], model.config.vocab_size)
    logits, session = optimized.prefill(ids, mask, num_beams=3, max_new_tokens=8)
    tokens = logits.argmax(-1).repeat_interleave(3)
    for _ in range(3):
        logits = session.decode(tokens)
        tokens = logits.argmax(-1)
    cache = session.cache
    kv = [*cache.prompt.storage.tensors(), *cache.response.tensors()]
    snapshot = [(tensor.data_ptr(), tensor.clone()) for tensor in kv]
    slots_before = cache.beam_slots.clone()
    parents = torch.tensor([2, 2, 0, 4, 3, 3])  # within each request's three beams
    cache.reorder(parents)
    for tensor, (address, values) in zip(kv, snapshot, strict=True):
        assert tensor.data_ptr() == address and torch.equal(tensor, values)
    assert torch.equal(cache.beam_slots[:, :3], slots_before[parents, :3])


@pytest.mark.parametrize("kv_cache", ["segment", "paged"])
def test_decoding_past_the_reserved_capacity_grows_in_steps(kv_cache):
    """forward() reserves no new tokens, so the cache's room is RESPONSE_STEP (a paged cache's blocks also
    hold the prompt's last block's spare columns); decoding past it grows the cache by RESPONSE_STEP."""
    model = tiny_model("qwen2-bias")
    optimized = xpu_coopt.optimize(model, kv_cache=kv_cache)
    ids, mask = left_padded_prompts([6, 4], model.config.vocab_size)
    out = optimized(ids, mask)
    cache = out.cache.cache
    room = cache.capacity
    assert room == (2 * BLOCK_SIZE - 6 if kv_cache == "paged" else RESPONSE_STEP)
    for _ in range(room + 3):
        next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        out = optimized(next_tokens, cache=out.cache)
        ids = torch.cat((ids, next_tokens), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_tokens)), dim=1)
    assert cache.capacity == room + RESPONSE_STEP
    expected = transformers_logits(model, ids, mask)[:, -1]
    torch.testing.assert_close(out.logits[:, -1], expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("beams", [1, 2])
def test_a_cache_grown_to_the_window_becomes_a_ring(beams):
    """A window of 24 on every layer, prompts 5 wide and no new tokens reserved: the segment the generated
    tokens go to (one beam: the prompt's, 5 + 16 columns; beams: the response's, 16) is narrower than the
    window; decoding past it grows it by 16, a ring from then on (it never grows again), which the next 40
    tokens go round. The last logits are transformers' over the whole sequence."""
    cls, config = CONFIGS["mistral-window"]
    config = copy.deepcopy(config)
    config.sliding_window = 24
    torch.manual_seed(24)
    model = cls(config).eval()
    optimized = xpu_coopt.optimize(model)
    ids, mask = left_padded_prompts([5, 3], config.vocab_size)
    logits, session = optimized.prefill(ids, mask, num_beams=beams, max_new_tokens=0)
    cache = session.cache
    logits = logits.repeat_interleave(beams, dim=0)

    def cells() -> int:
        return cache.prompt.capacity() - 5 if beams == 1 else cache.response.columns

    assert (cells(), cache.capacity) == (RESPONSE_STEP, RESPONSE_STEP)
    for _ in range(RESPONSE_STEP + 40):  # both beams of a request follow its greedy path
        next_tokens = logits.argmax(-1)
        logits = session.decode(next_tokens)
        if beams > 1:  # swapping beams of one history changes nothing but the ring's slots
            cache.reorder(torch.tensor([1, 0, 3, 2]))
        ids = torch.cat((ids, next_tokens[::beams, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_tokens[::beams, None])), dim=1)
    assert (cells(), cache.capacity) == (2 * RESPONSE_STEP, math.inf)
    expected = transformers_logits(model, ids, mask)[:, -1].repeat_interleave(beams, dim=0)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=2e-5)


def test_one_beam_cache_continues_the_prompt_segment():
    model = tiny_model("llama-gqa-8q2kv-d64")
    optimized = xpu_coopt.optimize(model)
    spec = optimized.spec
    ids, mask = left_padded_prompts([9, 4], spec.vocab_size)
    _, session = optimized.prefill(ids, mask, num_beams=1, max_new_tokens=5)
    cache = session.cache
    assert cache.response.columns == 0 and cache.beam_slots.numel() == 0
    assert cache.nbytes() == spec.kv_bytes_per_token(4) * 2 * (9 + RESPONSE_STEP)


def test_beam_cache_grows_past_its_capacity():
    model = tiny_model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model)
    ids, mask = left_padded_prompts([6, 3], model.config.vocab_size)
    logits, session = optimized.prefill(ids, mask, num_beams=2, max_new_tokens=0)
    cache = session.cache
    logits = logits.repeat_interleave(2, dim=0)
    for _ in range(RESPONSE_STEP + 2):  # both beams of a request follow its greedy path
        next_tokens = logits.argmax(-1)
        logits = session.decode(next_tokens)
        cache.reorder(torch.tensor([1, 0, 2, 3]))  # swapping beams of identical history changes nothing
        ids = torch.cat((ids, next_tokens[::2, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_tokens[::2, None])), dim=1)
    assert cache.capacity == 2 * RESPONSE_STEP
    expected = transformers_logits(model, ids, mask)[:, -1].repeat_interleave(2, dim=0)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=2e-5)


def test_reorder_rejects_parents_outside_their_request():
    model = tiny_model("llama-mha-d64")
    ids, mask = left_padded_prompts([7, 5], model.config.vocab_size)
    cache = xpu_coopt.optimize(model).prefill(ids, mask, num_beams=2, max_new_tokens=4)[1].cache
    with pytest.raises(ValueError, match="each within its own request's beams"):
        cache.reorder(torch.tensor([2, 0, 2, 3]))  # sequence 0 (request 0) cannot continue slot 2 (request 1)
    with pytest.raises(ValueError, match="must hold 4 slots, one per sequence"):
        cache.reorder(torch.tensor([0, 1]))
    cache.reorder(torch.tensor([1, 0, 2, 3]), check=False)  # the caller's guarantee: no wait for the device


@pytest.mark.parametrize("beams", [1, 3])
def test_a_cache_fits_and_resets_for_a_generation_within_its_room(beams):
    """What generate() asks before it reuses a kept cache (and its decode graph): as many prompts and
    beams, room for the prompt and max_new_tokens (10 new tokens made room for 16: RESPONSE_STEP). A
    reset keeps every tensor a decode graph reads."""
    model = tiny_model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model)
    ids, mask = left_padded_prompts([9, 6], model.config.vocab_size)
    cache = optimized.prefill(ids, mask, num_beams=beams, max_new_tokens=10)[1].cache
    cache.use_device_lengths()
    two, one = torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    assert cache.fits(two, 9, beams, 16) and cache.fits(two, 4, beams, 1)
    assert not cache.fits(two, 9, beams, 17)  # two response steps of room
    # One beam: the prompt and the new tokens share one segment's 25 columns.
    assert cache.fits(two, 12, beams, 13) == (beams == 1)
    assert not cache.fits(one, 9, beams, 1) and not cache.fits(two, 9, beams + 1, 1)
    addresses = {name: tensor.data_ptr() for name, tensor in cache.graph_inputs().items()}
    starts = torch.tensor([0, 2], dtype=torch.int32)
    cache.reset(starts, 5)
    assert {name: tensor.data_ptr() for name, tensor in cache.graph_inputs().items()} == addresses
    assert torch.equal(cache.prompt_start, starts) and (cache.prompt_len, cache.response_len) == (5, 0)
    assert cache.capacity == (16 + 4 if beams == 1 else 16)  # one beam: the prompt's unused columns too
    with pytest.raises(ValueError, match="2 prompts of 30 columns do not fit this cache's 2 of at most"):
        cache.reset(starts, 30)


@pytest.mark.parametrize("kv_cache", ["segment", "paged"])
@pytest.mark.parametrize("beams", [1, 3])
def test_a_reset_cache_under_a_window_decodes_as_a_new_one(kv_cache, beams):
    """A window of 6 on every layer: a cache made for prompts 35 wide keeps 5 of their columns, so prompts
    60 wide fit it too (they keep 5), and after a reset the cache, set to device lengths as a decode graph
    has it, gives a new cache's logits at every step. With one beam the segment cache's prompt segment is
    a ring of the window's 6 cells, with beams either cache's response segment: any generation fits them,
    its 16 steps going round more than twice."""
    model = tiny_model("mistral-window")
    optimized = xpu_coopt.optimize(model, kv_cache=kv_cache)
    ids, mask = left_padded_prompts([35, 2, 17], model.config.vocab_size, seed=5)
    logits, session = optimized.prefill(ids, mask, beams, 16)
    cache = session.cache
    cache.use_device_lengths()
    tokens = logits.argmax(-1).repeat_interleave(beams)
    for _ in range(3):
        tokens = session.decode(tokens).argmax(-1)
    ids, mask = left_padded_prompts([60, 30, 3], model.config.vocab_size, seed=6)
    # Rings of the window's 6 cells (a one-beam segment cache's prompt segment, with beams the response
    # segment) fit any generation; a one-beam paged cache's table 16 more tokens.
    ring = kv_cache == "segment" or beams > 1
    three = torch.zeros(3, dtype=torch.int32)
    assert cache.fits(three, 60, beams, 16) and cache.fits(three, 60, beams, 33) == ring
    assert (cache.prompt.capacity() if beams == 1 else cache.response.columns) == 6 or not ring
    _, positions, starts = prompt_layout(ids, mask, optimized.spec)
    cache.reset(starts, 60)
    assert cache.kept_columns == 5 and cache.kept_start.tolist() == [0, 0, 2]
    with torch.inference_mode():  # as prefill() runs it
        reused = optimized.decoder.forward(ids, positions, cache, True)
    cache.end_step()
    expected, new = optimized.prefill(ids, mask, beams, 16)
    torch.testing.assert_close(reused, expected, atol=0, rtol=0)
    tokens = expected.argmax(-1).repeat_interleave(beams)
    for _ in range(16):
        expected = new.decode(tokens)
        torch.testing.assert_close(session.decode(tokens), expected, atol=0, rtol=0)
        tokens = expected.argmax(-1)


# Paged cache (kv_cache="paged", Opt-Pa): the same outputs as the segment cache, in blocks of a pool sized once.

SEARCHES = {
    "greedy": dict(do_sample=False),
    "beam3": dict(num_beams=3, do_sample=False),
    "samples2": dict(do_sample=True, num_return_sequences=2, top_k=20),
}


@pytest.mark.parametrize("search", sorted(SEARCHES))
@pytest.mark.parametrize("name", ["llama-gqa-8q2kv-d64", "qwen2-bias"])
def test_paged_cache_generates_as_transformers(name, search):
    """Unequal prompts (two of the three have blocks of padding alone), 37 new tokens (new blocks at three
    decode steps): tokens and per-step scores equal transformers'."""
    model = tiny_model(name)
    ids, mask = left_padded_prompts([40, 3, 21], model.config.vocab_size, seed=4)
    kwargs = dict(max_new_tokens=37, pad_token_id=0, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True, **SEARCHES[search])  # fmt: skip
    outputs = []
    for generate in (xpu_coopt.optimize(model, kv_cache="paged").generate, model.generate):
        torch.manual_seed(0)
        outputs.append(generate(ids, attention_mask=mask, **kwargs))
    ours, theirs = outputs
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (actual, expected) in enumerate(zip(ours.scores, theirs.scores, strict=True)):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5, msg=f"scores of step {step}")


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_paged_cache_gives_the_segment_caches_logits(dtype, kv_dtype, num_beams):
    """Step by step, the paged cache's logits are the segment cache's, in every dtype and KV format: the
    same K/V, read through the block table."""
    model = tiny_model("llama-gqa-8q2kv-d64", dtype)
    ids, mask = left_padded_prompts([35, 2, 17], model.config.vocab_size, seed=5)
    models = [xpu_coopt.optimize(model, kv_dtype=kv_dtype, kv_cache=kind) for kind in ("segment", "paged")]
    (logits, session), (paged_logits, paged) = (m.prefill(ids, mask, num_beams, 20) for m in models)
    assert isinstance(paged.cache.prompt, PagedPrompt)
    torch.testing.assert_close(paged_logits, logits, atol=0, rtol=0)
    tokens = logits.argmax(-1).repeat_interleave(num_beams)
    for _ in range(20):
        logits = session.decode(tokens)
        paged_logits = paged.decode(tokens)
        torch.testing.assert_close(paged_logits, logits, atol=0, rtol=0)
        tokens = logits.argmax(-1)


def test_paged_cache_with_static_fp8_scales_gives_the_segment_caches_logits():
    """Per-tensor static scales are broadcast views with zero strides: the paged pool holds them without
    storage, and the kernels read them through the block table as through the segment."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    scales = KVScales(key_amax=(3.0, 5.0), value_amax=(2.0, 4.0))
    ids, mask = left_padded_prompts([35, 2, 17], model.config.vocab_size, seed=7)
    models = [
        xpu_coopt.optimize(model, kv_dtype="fp8_e4m3", kv_scales=scales, kv_cache=kind)
        for kind in ("segment", "paged")
    ]
    (logits, session), (paged_logits, paged) = (m.prefill(ids, mask, 1, 20) for m in models)
    tokens = logits.argmax(-1)
    for _ in range(20):  # new blocks at two block boundaries
        logits, paged_logits = session.decode(tokens), paged.decode(tokens)
        torch.testing.assert_close(paged_logits, logits, atol=0, rtol=0)
        tokens = logits.argmax(-1)
    assert paged.cache.prompt.storage[1].k_scale.stride() == (0, 0, 0)  # a broadcast of the layer's one scale


def _blocks(columns: int) -> int:
    return -(-columns // BLOCK_SIZE)


def test_paged_cache_stores_no_block_of_padding_alone():
    """Prompts of 40, 3 and 21 tokens in a batch 40 wide, room for 100 new tokens (112 columns, 7 blocks a
    request): blocks 3 + 7, 1 + 7 and 2 + 7 and the sink, where the segment cache holds 3 x 152 columns;
    beams add their response segments as in the segment cache, and their prompt blocks alone are paged."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    spec = xpu_coopt.optimize(model).spec
    ids, mask = left_padded_prompts([40, 3, 21], spec.vocab_size)
    paged = xpu_coopt.optimize(model, kv_cache="paged")
    cache = paged.prefill(ids, mask, num_beams=1, max_new_tokens=100)[1].cache
    assert cache.prompt.pool_blocks() == 1 + (3 + 7) + (1 + 7) + (2 + 7)
    per_token = spec.kv_bytes_per_token(4)
    table_bytes = 3 * _blocks(40 + 112) * 4
    assert cache.nbytes() == per_token * BLOCK_SIZE * 28 + table_bytes
    segment = xpu_coopt.optimize(model).prefill(ids, mask, num_beams=1, max_new_tokens=100)[1].cache
    assert segment.nbytes() == per_token * 3 * (40 + 112)
    beams = paged.prefill(ids, mask, num_beams=2, max_new_tokens=16)[1].cache
    response_bytes = (per_token + 4) * 6 * 16  # K/V and beam_slots of 6 sequences x 16 steps
    assert beams.nbytes() == per_token * BLOCK_SIZE * 7 + 3 * _blocks(40) * 4 + response_bytes


def test_a_paged_pool_is_sized_once_and_its_blocks_taken_as_tokens_arrive():
    """One beam, prompts of 30 and 12 tokens, 200 new tokens: the pool holds the sink and every block the
    generation can come to use (15 table columns each, less request 1's block of padding alone) from the
    prefill on, and never moves; each request takes its next block when its next column starts one, all
    at the same step (left padding aligns their columns)."""
    model = tiny_model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model, kv_cache="paged")
    ids, mask = left_padded_prompts([30, 12], model.config.vocab_size)
    logits, session = optimized.prefill(ids, mask, num_beams=1, max_new_tokens=200)
    prompt = session.cache.prompt
    assert prompt.pool_blocks() == 1 + 2 * _blocks(30 + 208) - 1
    assert prompt.blocks_in_use(30) == 1 + 2 + 1
    pool = [tensor.data_ptr() for tensor in prompt.storage.tensors()]
    tokens = logits.argmax(-1)
    for step in range(40):  # columns 30 .. 69: new blocks at columns 32, 48 and 64
        tokens = session.decode(tokens).argmax(-1)
        # the sink, each request's blocks up to column 30 + step, less request 1's block of padding alone
        assert prompt.blocks_in_use(30 + step + 1) == 1 + 2 * _blocks(30 + step + 1) - 1
    assert [tensor.data_ptr() for tensor in prompt.storage.tensors()] == pool


def test_a_paged_generation_uses_its_pool_whole_by_its_last_token():
    """Prompts of 200 and 100 columns (13 and 7 blocks) with room for 16 new tokens need one more block
    each when the columns reach 208: the pool holds exactly those."""
    model = tiny_model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model, kv_cache="paged")
    ids, mask = left_padded_prompts([200, 100], model.config.vocab_size)
    logits, session = optimized.prefill(ids, mask, num_beams=1, max_new_tokens=16)
    cache = session.cache
    assert cache.prompt.pool_blocks() == 1 + 14 + 8 and cache.prompt.blocks_in_use(200) == 1 + 13 + 7
    tokens = logits.argmax(-1)
    for _ in range(cache.capacity):
        tokens = session.decode(tokens).argmax(-1)
    assert cache.prompt.blocks_in_use(200 + cache.response_len) == cache.prompt.pool_blocks()


def test_a_paged_cache_reuses_the_blocks_a_sliding_window_has_passed():
    """A window on every layer (36 columns, wider than the prompts): a request's next block is its oldest
    one wholly before the window. Prompts 35 wide of 35, 2 and 17 tokens (blocks 3, 1 and 2 from table
    columns 0, 2 and 1): the table's 4th column (column 48 on) takes new blocks; the 5th (column 64, whose
    window starts at 29) request 0's first block and new ones for the two whose first column was padding
    alone; the 6th request 0's and 2's second block and a new one; from then on every column reuses. Over
    100 tokens the logits are the segment cache's, and the pool holds 13 blocks where 25 would be needed
    without reuse. A model with a layer of full attention (Qwen2's first max_window_layers) reuses none."""
    model = tiny_model("mistral-window")
    model.config.sliding_window = 36
    ids, mask = left_padded_prompts([35, 2, 17], model.config.vocab_size, seed=5)
    models = [xpu_coopt.optimize(model, kv_cache=kind) for kind in ("segment", "paged")]
    (logits, session), (paged_logits, paged) = (m.prefill(ids, mask, 1, 120) for m in models)
    prompt = paged.cache.prompt
    assert paged.cache.window.span == 36 and prompt.blocks_in_use(35) == 1 + 3 + 1 + 2
    assert prompt.pool_blocks() == 13
    tokens = logits.argmax(-1)
    used = []
    for step in range(100):
        logits, paged_logits = session.decode(tokens), paged.decode(tokens)
        torch.testing.assert_close(paged_logits, logits, atol=0, rtol=0)
        tokens = logits.argmax(-1)
        used.append(prompt.blocks_in_use(35 + step + 1))
    # new blocks at columns 48 (step 13), 64 (step 29) and 80 (step 45), none after
    assert used == [7] * 13 + [10] * 16 + [12] * 16 + [13] * 55
    assert prompt.block_table[:, 3:9].tolist() == [
        [7, 1, 2, 3, 7, 1],
        [8, 10, 12, 4, 8, 10],
        [9, 11, 5, 6, 9, 11],
    ]
    full_layers = xpu_coopt.optimize(tiny_model("qwen2-window"), kv_cache="paged").prefill(ids, mask, 1, 20)[
        1
    ]
    assert full_layers.cache.window.span is None


@pytest.mark.parametrize("kv_cache", ["segment", "paged"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_window_on_every_layer_keeps_the_prompts_last_window_of_columns(kv_cache, num_beams):
    """A window of 6 on every layer and prompts 35 wide (35, 2 and 17 tokens): the first generated token's
    window starts at column 30, so the prompt segment keeps columns 30-34 (5, as transformers' sliding
    cache keeps window - 1 tokens), and the prompts start at columns 0, 3 and 0 of it. Tokens and every
    step's scores equal transformers' (its own sliding-window cache), and the cache holds 5 prompt
    columns where a model without the window holds 35; with one beam the segment cache holds the window's
    6 columns in all, a ring the 16 generated tokens go round more than twice, with beams each sequence's
    response segment such a ring. The paged pool: a block a request for the prompt, with one beam another
    for the new tokens' columns (the window passes no block before column 32)."""
    model = tiny_model("mistral-window")
    ids, mask = left_padded_prompts([35, 2, 17], model.config.vocab_size, seed=5)
    optimized = xpu_coopt.optimize(model, kv_cache=kv_cache)
    cache = optimized.prefill(ids, mask, num_beams, 16)[1].cache
    assert cache.kept_columns == 5 and cache.kept_start.tolist() == [0, 3, 0]
    per_token = optimized.spec.kv_bytes_per_token(4)
    if kv_cache == "segment":  # one beam: a ring of the window's cells; beams: one for prefill's other writes
        columns = 6 if num_beams == 1 else 5 + 1
        # Beams: a ring of the window's cells for the K/V and beam_slots of each of 9 sequences.
        response = 0 if num_beams == 1 else 9 * 6 * (per_token + 4)
        assert cache.nbytes() == per_token * 3 * columns + response
    else:  # the prompts' first columns never mapped
        assert cache.prompt.pool_blocks() == 1 + 3 * (2 if num_beams == 1 else 1)
    kwargs = dict(max_new_tokens=16, pad_token_id=0, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True, num_beams=num_beams, do_sample=False)  # fmt: skip
    ours, theirs = (
        generate(ids, attention_mask=mask, **kwargs) for generate in (optimized.generate, model.generate)
    )
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (actual, expected) in enumerate(zip(ours.scores, theirs.scores, strict=True)):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5, msg=f"scores of step {step}")


@pytest.mark.parametrize(
    ("window", "table"),
    [(17, [1, 2, 1, 2, 1]), (33, [1, 2, 3, 1, 2])],
    ids=["block-and-one", "two-blocks-and-one"],
)
def test_a_paged_cache_reuses_a_block_once_the_window_has_passed_it(window, table):
    """A block is reused at the first column whose window starts after it: with a window of 17, column 32
    (window from 16) takes block 0's columns 0-15; with 33, column 48. One column earlier the block is
    still read (33: column 32's window starts at 0), so the logits would differ from the segment cache's;
    later, the table would hold one more block."""
    model = tiny_model("mistral-window")
    model.config.sliding_window = window
    ids, mask = left_padded_prompts([16], model.config.vocab_size, seed=5)
    models = [xpu_coopt.optimize(model, kv_cache=kind) for kind in ("segment", "paged")]
    (logits, session), (_, paged) = (m.prefill(ids, mask, 1, 80) for m in models)
    tokens = logits.argmax(-1)
    for _ in range(64):  # columns 16 to 79
        logits, paged_logits = session.decode(tokens), paged.decode(tokens)
        torch.testing.assert_close(paged_logits, logits, atol=0, rtol=0)
        tokens = logits.argmax(-1)
    assert paged.cache.prompt.block_table[0, :5].tolist() == table


def test_a_paged_generation_holds_the_blocks_of_its_max_new_tokens_however_early_it_stops():
    """EOS after a few tokens: the paged pool was sized at the prefill for max_new_tokens (as the segment
    cache's columns), so stopping early frees nothing while the generation runs, and nothing ever grows
    or moves; the tokens are the segment cache's."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([20], model.config.vocab_size, seed=6)
    eos = frequent_token(model, ids, mask)
    kwargs = dict(max_new_tokens=200, do_sample=False, pad_token_id=0, eos_token_id=eos,
                  return_dict_in_generate=True)  # fmt: skip
    segment = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    paged = xpu_coopt.optimize(model, kv_cache="paged").generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(paged.sequences, segment.sequences)
    assert segment.sequences.shape[1] < 20 + 20  # stopped early
    per_token, table_bytes = xpu_coopt.optimize(model).spec.kv_bytes_per_token(4), _blocks(20 + 208) * 4
    assert segment.kv_cache_bytes == per_token * (20 + 208)  # 200 new tokens, rounded to RESPONSE_STEP
    assert paged.kv_cache_bytes == per_token * BLOCK_SIZE * (1 + _blocks(20 + 208)) + table_bytes
