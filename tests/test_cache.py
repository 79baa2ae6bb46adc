"""The segment KV cache: memory proportional to P + B*R, beam reorders that move no K/V, growth."""

from __future__ import annotations

import pytest
import torch
from test_parity import _hf_logits, _model, _prompts

import xpu_coopt
from xpu_coopt.cache import RESPONSE_STEP


def test_kv_bytes_are_prompt_once_plus_response_per_beam():
    model = _model("llama-gqa-8q2kv-d64")
    spec = xpu_coopt.optimize(model).spec
    requests, beams, prompt_len, new_tokens = 2, 4, 33, 16
    ids, mask = _prompts([prompt_len, 20], spec.vocab_size)
    _, cache = xpu_coopt.optimize(model).prefill(ids, mask, beams, new_tokens)
    capacity = -(-new_tokens // RESPONSE_STEP) * RESPONSE_STEP
    per_token = spec.kv_bytes_per_token(4)  # float32 K and V of every layer
    expected = (
        per_token * (requests * prompt_len + requests * beams * capacity) + requests * beams * capacity * 4
    )
    assert cache.nbytes() == expected
    per_beam_contiguous = per_token * requests * beams * (prompt_len + new_tokens)
    assert cache.nbytes() < 0.55 * per_beam_contiguous  # (33 + 4 * 16) / (4 * 49) plus the index


def test_reorder_moves_integers_not_kv():
    model = _model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model)
    ids, mask = _prompts([7, 5], model.config.vocab_size)
    logits, cache = optimized.prefill(ids, mask, num_beams=3, max_new_tokens=8)
    tokens = logits.argmax(-1).repeat_interleave(3)
    for _ in range(3):
        logits = optimized.decode(tokens, cache)
        tokens = logits.argmax(-1)
    snapshot = {
        name: getattr(cache, name).clone() for name in ("prompt_k", "prompt_v", "response_k", "response_v")
    }
    pointers = {name: getattr(cache, name).data_ptr() for name in snapshot}
    slots_before = cache.beam_slots.clone()
    parents = torch.tensor([2, 2, 0, 4, 3, 3])  # within each request's three beams
    cache.reorder(parents)
    for name, values in snapshot.items():
        assert getattr(cache, name).data_ptr() == pointers[name]
        assert torch.equal(getattr(cache, name), values)
    assert torch.equal(cache.beam_slots[:, :3], slots_before[parents, :3])


def test_decoding_past_the_reserved_capacity_grows_in_steps():
    model = _model("qwen2-bias")
    optimized = xpu_coopt.optimize(model)
    ids, mask = _prompts([6, 4], model.config.vocab_size)
    out = optimized(ids, mask)  # forward() reserves no new tokens: the first decode step grows the cache
    cache = out.cache
    for _ in range(RESPONSE_STEP + 3):
        next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        out = optimized(next_tokens, cache=cache)
        ids = torch.cat((ids, next_tokens), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_tokens)), dim=1)
    assert cache.capacity == 2 * RESPONSE_STEP
    expected = _hf_logits(model, ids, mask)[:, -1]
    torch.testing.assert_close(out.logits[:, -1], expected, atol=2e-5, rtol=2e-5)


def test_one_beam_cache_continues_the_prompt_segment():
    model = _model("llama-gqa-8q2kv-d64")
    optimized = xpu_coopt.optimize(model)
    spec = optimized.spec
    ids, mask = _prompts([9, 4], spec.vocab_size)
    _, cache = optimized.prefill(ids, mask, num_beams=1, max_new_tokens=5)
    assert cache.response_k.numel() == 0 and cache.beam_slots.numel() == 0
    assert cache.nbytes() == spec.kv_bytes_per_token(4) * 2 * (9 + RESPONSE_STEP)


def test_beam_cache_grows_past_its_capacity():
    model = _model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model)
    ids, mask = _prompts([6, 3], model.config.vocab_size)
    logits, cache = optimized.prefill(ids, mask, num_beams=2, max_new_tokens=0)
    logits = logits.repeat_interleave(2, dim=0)
    for _ in range(RESPONSE_STEP + 2):  # both beams of a request follow its greedy path
        next_tokens = logits.argmax(-1)
        logits = optimized.decode(next_tokens, cache)
        cache.reorder(torch.tensor([1, 0, 2, 3]))  # swapping beams of identical history changes nothing
        ids = torch.cat((ids, next_tokens[::2, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_tokens[::2, None])), dim=1)
    assert cache.capacity == 2 * RESPONSE_STEP
    expected = _hf_logits(model, ids, mask)[:, -1].repeat_interleave(2, dim=0)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=2e-5)


def test_reorder_rejects_parents_outside_their_request():
    model = _model("llama-mha-d64")
    ids, mask = _prompts([7, 5], model.config.vocab_size)
    _, cache = xpu_coopt.optimize(model).prefill(ids, mask, num_beams=2, max_new_tokens=4)
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
    model = _model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model)
    ids, mask = _prompts([9, 6], model.config.vocab_size)
    _, cache = optimized.prefill(ids, mask, num_beams=beams, max_new_tokens=10)
    cache.use_device_lengths()
    assert cache.fits(2, 9, beams, 16) and cache.fits(2, 4, beams, 1)
    assert not cache.fits(2, 9, beams, 17)  # two response steps of room
    # One beam: the prompt and the new tokens share one segment's 25 columns.
    assert cache.fits(2, 12, beams, 13) == (beams == 1)
    assert not cache.fits(1, 9, beams, 1) and not cache.fits(2, 9, beams + 1, 1)
    addresses = {name: tensor.data_ptr() for name, tensor in cache.graph_inputs().items()}
    starts = torch.tensor([0, 2], dtype=torch.int32)
    cache.reset(starts, 5)
    assert {name: tensor.data_ptr() for name, tensor in cache.graph_inputs().items()} == addresses
    assert torch.equal(cache.prompt_start, starts) and (cache.prompt_len, cache.response_len) == (5, 0)
    assert cache.capacity == (16 + 4 if beams == 1 else 16)  # one beam: the prompt's unused columns too
    with pytest.raises(ValueError, match="2 prompts of 30 columns do not fit this cache's 2 of at most"):
        cache.reset(starts, 30)
