"""generate(prompt_lookup_num_tokens=N): greedy decoding whose steps check drafts looked up in the sequence.
The oracles: transformers' greedy generate (the same tokens, in fewer steps), transformers' own prompt
lookup candidates (the same drafts), and the optimized model's plain greedy decoding (scores, FP8 caches)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINYSTORIES_TEXT, require_data
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

import xpu_coopt
from xpu_coopt import PrefixCache
from xpu_coopt.cache.paged import BLOCK_SIZE, PagedPrompt
from xpu_coopt.cli.perplexity import tokenize
from xpu_coopt.generation.prompt_lookup import find_drafts

GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def quoting_prompt(stories_tokenizer):
    """A story's first 60 tokens, then its first 20 again: the model goes on quoting, so drafts hit."""
    ids = tokenize(stories_tokenizer, require_data(TINYSTORIES_TEXT).read_text(), 200)
    return torch.cat((ids[:60], ids[:20])).view(1, -1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("num_tokens", "ngram_size"), [(1, 1), (3, 2), (10, 2), (4, 3)])
def test_drafts_are_transformers_prompt_lookup_candidates(seed, num_tokens, ngram_size):
    generator = torch.Generator().manual_seed(seed)
    eos = torch.tensor([3])
    lookup = PromptLookupCandidateGenerator(eos, num_tokens, ngram_size, max_length=10_000)
    hits = 0
    for length in range(1, 40):
        sequence = torch.randint(0, 6, (length,), generator=generator)  # few ids: many repeated n-grams
        candidates, _ = lookup.get_candidates(sequence[None])
        drafts = find_drafts(sequence, num_tokens, ngram_size, eos)
        assert torch.equal(drafts, candidates[0, length:]), (sequence, drafts, candidates)
        hits += drafts.numel() > 0
    assert hits > 10


@pytest.mark.parametrize("seed", range(3))
def test_drafts_cut_where_processors_forbid_them_as_transformers_cuts_them(seed):
    """With logits processors, a draft they rule out (on uniform logits) cuts the drafts before it, and an
    occurrence left without drafts gives way to the next: here no 2-gram may repeat."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

    processors = LogitsProcessorList([NoRepeatNGramLogitsProcessor(2)])
    eos = torch.tensor([5])
    lookup = PromptLookupCandidateGenerator(eos, 4, 2, 10_000, logits_processor=processors, vocab_size=6)

    def forbidden(tokens, token):
        return bool(processors(tokens[None], torch.ones((1, 6)))[0, token] == float("-inf"))

    generator = torch.Generator().manual_seed(seed)
    cut = 0
    for length in range(2, 40):
        sequence = torch.randint(0, 6, (length,), generator=generator)
        candidates, _ = lookup.get_candidates(sequence[None])
        drafts = find_drafts(sequence, 4, 2, eos, forbidden)
        assert torch.equal(drafts, candidates[0, length:]), (sequence, drafts, candidates)
        cut += drafts.numel() < find_drafts(sequence, 4, 2, eos).numel()
    assert cut > 3


@pytest.mark.parametrize(
    "settings",
    [dict(top_k=20), dict(top_k=0, top_p=0.8, temperature=0.7), dict(top_k=30, repetition_penalty=1.3)],
    ids=["top_k", "top_p", "penalty"],
)
@pytest.mark.parametrize("seed", range(3))
def test_prompt_lookup_sampling_draws_transformers_tokens(stories_model, quoting_prompt, settings, seed):
    """Sampling: every step's rows drawn at once, as transformers draws them, so that one seed draws the
    same tokens (and the drafts the same: top_p on uniform logits and the penalty cut some)."""
    model = xpu_coopt.optimize(stories_model)
    kwargs = dict(max_new_tokens=24, do_sample=True, prompt_lookup_num_tokens=5, pad_token_id=0, **settings)
    torch.manual_seed(seed)
    expected = stories_model.generate(quoting_prompt, **kwargs)
    torch.manual_seed(seed)
    output = model.generate(quoting_prompt, return_dict_in_generate=True, **kwargs)
    assert torch.equal(output.sequences, expected)


@pytest.mark.parametrize(
    ("backend", "kv_cache"),
    [("torch", "segment"), ("torch", "paged"), ("sycl", "paged"), ("triton", "segment")],
)
def test_prompt_lookup_gives_transformers_greedy_tokens_in_fewer_steps(
    stories_model, quoting_prompt, backend, kv_cache
):
    model = xpu_coopt.optimize(stories_model, backend=backend, kv_cache=kv_cache)
    new_tokens = 12 if backend == "triton" else 24  # Triton's interpreter runs each step slowly
    expected = stories_model.generate(quoting_prompt, max_new_tokens=new_tokens, **GREEDY)
    output = model.generate(
        quoting_prompt,
        max_new_tokens=new_tokens,
        prompt_lookup_num_tokens=6,
        return_dict_in_generate=True,
        **GREEDY,
    )
    assert torch.equal(output.sequences, expected)
    assert output.accepted_drafts > 0
    # A step's tokens: its drafts kept and one more; the first step's first token is the prefill's, and
    # its drafts run in a forward pass of their own where the prompt has any.
    assert output.decode_steps + output.accepted_drafts in (new_tokens - 1, new_tokens)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("kv_cache", ["segment", "paged"])
def test_prompt_lookup_over_an_fp8_cache_gives_its_greedy_tokens(
    stories_model, quoting_prompt, kv_cache, kv_dtype
):
    """A step of several tokens reads the FP8 codes decoded, as a one-token step's kernel does: the same
    tokens as greedy decoding over the same cache, and scores equal up to rounding."""
    model = xpu_coopt.optimize(stories_model, kv_cache=kv_cache, kv_dtype=kv_dtype)
    kwargs = dict(max_new_tokens=24, return_dict_in_generate=True, output_scores=True, **GREEDY)
    expected = model.generate(quoting_prompt, **kwargs)
    output = model.generate(quoting_prompt, prompt_lookup_num_tokens=5, **kwargs)
    assert torch.equal(output.sequences, expected.sequences)
    assert output.accepted_drafts > 0
    assert len(output.scores) == len(expected.scores) == 24
    for step, (scores, expected_scores) in enumerate(zip(output.scores, expected.scores, strict=True)):
        torch.testing.assert_close(scores, expected_scores, atol=2e-4, rtol=2e-4, msg=f"step {step}")


def test_processors_eos_and_outputs_follow_transformers(stories_model, quoting_prompt):
    """Logits processors see each draft's history as it would stand, EOS ends the generation where greedy
    decoding's does (the drafts after it are dropped), and the scores and raw logits are one per token."""
    model = xpu_coopt.optimize(stories_model)
    settings = dict(
        GREEDY, max_new_tokens=30, repetition_penalty=1.2, no_repeat_ngram_size=4, min_new_tokens=3
    )
    free = stories_model.generate(quoting_prompt, **settings)
    eos = int(free[0, quoting_prompt.shape[1] + 9])  # the 10th new token ends the generation
    settings["eos_token_id"] = eos
    expected = stories_model.generate(
        quoting_prompt, return_dict_in_generate=True, output_scores=True, output_logits=True, **settings
    )
    output = model.generate(
        quoting_prompt,
        prompt_lookup_num_tokens=8,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **settings,
    )
    assert torch.equal(output.sequences, expected.sequences)
    assert output.sequences[0, -1] == eos
    for ours, theirs in [(output.scores, expected.scores), (output.logits, expected.logits)]:
        assert len(ours) == len(theirs) == output.sequences.shape[1] - quoting_prompt.shape[1]
        for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=f"step {step}")


def test_prompt_lookup_streams_its_tokens_and_keeps_a_conversation(stories_model, quoting_prompt):
    class Collect:
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            self.tokens.append("end")

    model = xpu_coopt.optimize(stories_model)
    prefix_cache, streamer = PrefixCache(), Collect()
    first = model.generate(
        quoting_prompt, max_new_tokens=16, prompt_lookup_num_tokens=4, past_key_values=prefix_cache,
        streamer=streamer, **GREEDY,
    )  # fmt: skip
    assert streamer.tokens == [*first[0].tolist(), "end"]
    assert torch.equal(prefix_cache.tokens, first[0, :-1])  # every token but the last went through the model
    second_prompt = torch.cat((first, quoting_prompt[:, 5:15]), dim=1)
    second = model.generate(
        second_prompt, max_new_tokens=16, prompt_lookup_num_tokens=4, past_key_values=prefix_cache, **GREEDY
    )
    assert prefix_cache.reused_tokens == first.shape[1] - 1
    assert torch.equal(second, stories_model.generate(second_prompt, max_new_tokens=16, **GREEDY))


@pytest.mark.parametrize("kv_cache", ["segment", "paged"])
def test_runs_between_the_steps_of_a_cache_set_to_device_lengths(stories_model, quoting_prompt, kv_cache):
    """As a decode graph has its cache: one-token steps read their lengths from device tensors, and runs of
    several tokens between them (eager, host lengths) drop their rejected tokens' K/V. Every kept token's
    logits are those of one-token steps over a cache with host lengths."""
    model = xpu_coopt.optimize(stories_model, kv_cache=kv_cache)
    tokens = quoting_prompt[0, 1:30]
    _, plain = model.prefill(quoting_prompt, max_new_tokens=32)
    expected = [plain.decode(token.view(1))[0] for token in tokens]
    _, session = model.prefill(quoting_prompt, max_new_tokens=32)
    session.cache.use_device_lengths()
    done = 0
    for count, kept in [(1, 1), (4, 2), (1, 1), (6, 6), (5, 1), (1, 1), (7, 3), (3, 3), (1, 1)]:
        if count == 1:
            logits = session.decode(tokens[done : done + 1])
        else:  # drafts after the kept ones wrong: their K/V must not be read again
            fed = torch.cat((tokens[done : done + kept], torch.full((count - kept,), 7)))
            logits = session.decode_run(fed)
            session.keep_run(kept)
        for row in range(kept):
            torch.testing.assert_close(logits[row], expected[done + row], atol=1e-4, rtol=1e-4)
        done += kept
    assert done == 19


def test_a_paged_run_writes_through_the_planned_blocks(stories_model):
    """A run of tokens crossing into the next block writes through the blocks planned at the prefill;
    rejected, its columns are written again by the next steps, through the same blocks: the table never
    changes and the blocks in use grow as the columns do."""
    model = xpu_coopt.optimize(stories_model, kv_cache="paged")
    prompt = torch.arange(1, BLOCK_SIZE - 1).view(1, -1)  # 14 columns: a run of 4 crosses into block 1
    _, session = model.prefill(prompt, max_new_tokens=8)
    paged = session.cache.prompt
    assert isinstance(paged, PagedPrompt) and paged.pool_blocks() == 3  # the sink, the prompt's and the next
    planned = paged.block_table.clone()
    assert paged.blocks_in_use(14) == 2
    session.decode_run(torch.tensor([5, 6, 7, 8]))
    session.keep_run(1)
    for token in (9, 10, 11):
        session.decode(torch.tensor([token]))
    assert paged.blocks_in_use(14 + 4) == 3 and torch.equal(paged.block_table, planned)
    with pytest.raises(ValueError, match="keeps 0 to 2 of them, not 3"):
        session.decode_run(torch.tensor([1, 2]))
        session.keep_run(3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be an integer >= 1, got 0"),
        (dict(prompt_lookup_num_tokens=2.5), "prompt_lookup_num_tokens must be an integer, got 2.5"),
        (dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=0), "max_matching_ngram_size must be"),
        (dict(prompt_lookup_num_tokens=3, num_beams=2), "takes num_beams=1 and num_return_sequences=1"),
        (
            dict(prompt_lookup_num_tokens=3, do_sample=True, num_return_sequences=2),
            "takes num_beams=1 and num_return_sequences=1",
        ),
    ],
)
def test_bad_prompt_lookup_settings(stories_model, quoting_prompt, kwargs, message):
    model = xpu_coopt.optimize(stories_model)
    with pytest.raises(ValueError, match=message):
        model.generate(quoting_prompt, max_new_tokens=4, **kwargs)


def test_prompt_lookup_takes_one_prompt_and_a_sequence_within_a_window_on_every_layer(
    stories_model, stories_window_model
):
    prompts = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    with pytest.raises(ValueError, match=r"one prompt per generate\(\) call .* a batch of 2"):
        xpu_coopt.optimize(stories_model).generate(prompts, max_new_tokens=4, prompt_lookup_num_tokens=3)
    window = stories_window_model.config.sliding_window
    with pytest.raises(ValueError, match=rf"within the window \({window} tokens\): .* come to 14"):
        xpu_coopt.optimize(stories_window_model).generate(
            prompts[:1], max_new_tokens=7, prompt_lookup_num_tokens=3
        )


@pytest.mark.parametrize("kv_cache", ["segment", "paged"])
def test_prompt_lookup_within_a_window_on_every_layer_gives_transformers_greedy_tokens(
    stories_model, quoting_prompt, kv_cache
):
    """Mistral's architecture (a window on every layer): a sequence within the window, where the cache holds
    every column."""
    from conftest import _stories_as
    from transformers import MistralConfig, MistralForCausalLM

    model = _stories_as(stories_model, MistralConfig, MistralForCausalLM, sliding_window=128)
    kwargs = dict(max_new_tokens=24, **GREEDY)
    output = xpu_coopt.optimize(model, kv_cache=kv_cache).generate(
        quoting_prompt, prompt_lookup_num_tokens=6, return_dict_in_generate=True, **kwargs
    )
    assert torch.equal(output.sequences, model.generate(quoting_prompt, **kwargs))
    assert output.accepted_drafts > 0
