"""xpu_coopt against transformers itself on random-weight configs of every supported shape."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CONFIGS,
    SMOLLM3_TOKENS,
    assert_logits_close,
    check_prefill_and_decode,
    frequent_token,
    left_padded_prompts,
    tiny_model,
)
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

import xpu_coopt

LOSS_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-3}


SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=32, intermediate_size=32,
             num_hidden_layers=3)  # fmt: skip


SMOLLM3_SMALL = {**SMALL, **SMOLLM3_TOKENS, "no_rope_layer_interval": 3}  # layer 2 without rope
ARCHITECTURES = {
    LlamaConfig: LlamaForCausalLM, MistralConfig: MistralForCausalLM, Qwen2Config: Qwen2ForCausalLM,
    Qwen3Config: Qwen3ForCausalLM, SmolLM3Config: SmolLM3ForCausalLM,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_identical(name):
    model = tiny_model(name)
    ids, mask = left_padded_prompts([5, 9], model.config.vocab_size, seed=1)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    theirs = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("name", "num_beams"),
    [("llama-mha-d64", 1), ("llama-mha-d64", 2), ("llama3-rope", 1), ("llama-linear-rope", 1),
     ("qwen2-yarn", 1), ("mistral-window", 2)],
)  # fmt: skip
def test_generation_past_max_position_embeddings_matches_transformers(name, num_beams):
    """Rope types whose frequencies do not depend on the length rotate positions past
    max_position_embeddings (256) as transformers does, which generates there too; both warn."""
    model = tiny_model(name)
    ids, mask = left_padded_prompts([250, 243], model.config.vocab_size, seed=3)
    kwargs = dict(max_new_tokens=20, num_beams=num_beams, do_sample=False, pad_token_id=0, eos_token_id=None)
    optimized = xpu_coopt.optimize(model)
    with pytest.warns(UserWarning, match=r"past the model's max_position_embeddings \(256\)"):
        ours = optimized.generate(ids, attention_mask=mask, **kwargs)
    assert optimized.decoder.cos_sin_cache.shape[0] >= 270
    assert torch.equal(ours, model.generate(ids, attention_mask=mask, **kwargs))


def test_decode_steps_past_max_position_embeddings_match_transformers():
    """forward() with a cache decodes step by step, past what its prefill planned for: each step past
    max_position_embeddings (256) extends the rotary table."""
    model = tiny_model("llama3-rope")
    optimized = xpu_coopt.optimize(model)
    with pytest.warns(UserWarning, match="past the model's max_position_embeddings"):
        check_prefill_and_decode(model, optimized, [254, 250], torch.float32)
    assert optimized.decoder.cos_sin_cache.shape[0] >= 258


def test_dynamic_rope_beyond_max_position_embeddings_is_an_error():
    """Where dynamic NTK scaling would raise theta, generate() refuses, naming it, before the prompt runs."""
    model = tiny_model("llama-dynamic-rope")
    ids, _ = left_padded_prompts([250], model.config.vocab_size)
    with pytest.raises(ValueError, match="dynamic rope scaling beyond it is not supported"):
        xpu_coopt.optimize(model).generate(ids, max_new_tokens=10, pad_token_id=0)


@pytest.mark.parametrize(
    ("name", "num_beams", "num_return_sequences", "length_penalty", "early_stopping"),
    [
        ("llama-gqa-8q2kv-d64", 4, 1, 1.0, False),
        ("llama-mha-d64", 4, 2, 0.5, True),
        ("qwen2-bias", 3, 3, 1.5, "never"),
        ("llama-mqa-d128", 2, 1, -1.0, False),
        ("mistral", 4, 4, 1.0, True),
        ("mistral-window", 3, 2, 1.0, False),
        ("qwen2-window", 4, 1, 1.0, "never"),
        ("smollm3-window", 3, 1, 1.0, False),
        ("qwen3-window", 4, 2, 1.0, True),
    ],
)
def test_beam_search_identical(name, num_beams, num_return_sequences, length_penalty, early_stopping):
    model = tiny_model(name)
    ids, mask = left_padded_prompts([6, 10], model.config.vocab_size, seed=2)
    kwargs = dict(
        max_new_tokens=10, num_beams=num_beams, num_return_sequences=num_return_sequences,
        length_penalty=length_penalty, early_stopping=early_stopping, do_sample=False,
        eos_token_id=frequent_token(model, ids, mask), pad_token_id=0,
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    theirs = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_matches_transformers_with_the_same_seed(seed):
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([4, 8], model.config.vocab_size, seed=3)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, pad_token_id=0)
    torch.manual_seed(seed)
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(seed)
    theirs = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, theirs)


def _matches_transformers(model, ids, mask, seed: int | None = None, **kwargs):
    """xpu_coopt's generate and transformers' on the same inputs (each after torch.manual_seed(seed) when
    sampling): the same tokens and, step by step, the same processed scores. Returns xpu_coopt's output."""
    kwargs = {**kwargs, "return_dict_in_generate": True, "output_scores": True}
    outputs = []
    for generate in (xpu_coopt.optimize(model).generate, model.generate):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(generate(ids, attention_mask=mask, **kwargs))
    ours, theirs = outputs
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (actual, expected) in enumerate(zip(ours.scores, theirs.scores, strict=True)):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5, msg=f"scores of step {step}")
    return ours


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_several_sequences_per_prompt_matches_transformers(seed):
    """num_return_sequences samples of each prompt, drawn side by side as transformers draws them, with
    the prompt's K/V stored once for all of them."""
    model = tiny_model("qwen2-bias")
    ids, mask = left_padded_prompts([5, 40], model.config.vocab_size, seed=9)
    kwargs = dict(
        max_new_tokens=10, do_sample=True, temperature=0.9, top_k=30, repetition_penalty=1.1, pad_token_id=0,
        eos_token_id=frequent_token(model, ids, mask),
    )  # fmt: skip
    ours = _matches_transformers(model, ids, mask, seed, num_return_sequences=3, **kwargs)
    assert ours.sequences.shape[0] == 6
    assert not torch.equal(ours.sequences[0], ours.sequences[1])  # three samples, not one copied
    # The 40-column prompts are held once: 40 + 3 x 16 response columns a prompt, not 3 x (40 + 16).
    single = xpu_coopt.optimize(model).generate(
        ids, attention_mask=mask, return_dict_in_generate=True, **kwargs
    )
    assert ours.kv_cache_bytes < 0.6 * 3 * single.kv_cache_bytes


@pytest.mark.parametrize(
    "search", [dict(do_sample=False), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beam3"]
)
def test_output_logits_match_transformers(search):
    """Each step's raw logits, float32, one row per sequence (beam search: per running beam)."""
    model = tiny_model("mistral")
    ids, mask = left_padded_prompts([4, 7], model.config.vocab_size, seed=12)
    kwargs = dict(
        max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True, output_logits=True, **search
    )
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    theirs = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.logits) == len(theirs.logits) == ours.sequences.shape[1] - ids.shape[1]
    for actual, expected in zip(ours.logits, theirs.logits, strict=True):
        assert actual.dtype == torch.float32
        assert_logits_close(actual, expected, torch.float32)
    assert not torch.equal(ours.logits[0], ours.logits[1])  # a copy per step, not one buffer


@pytest.mark.parametrize("search", [dict(do_sample=False), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_min_length_counts_the_padded_prompt_as_transformers(search):
    model = tiny_model("llama-mha-d64")
    ids, mask = left_padded_prompts([5, 7], model.config.vocab_size, seed=4)
    eos = frequent_token(model, ids, mask)
    kwargs = dict(max_new_tokens=9, min_length=ids.shape[1] + 4, eos_token_id=eos, pad_token_id=1, **search)
    ours = _matches_transformers(model, ids, mask, **kwargs)
    for step in ours.scores[:4]:
        assert step[:, eos].isneginf().all()
    assert not ours.scores[4][:, eos].isneginf().any()


def test_min_new_tokens_and_eos_list_match_transformers():
    model = tiny_model("llama-mha-d64")
    ids, mask = left_padded_prompts([5, 7], model.config.vocab_size, seed=4)
    eos = frequent_token(model, ids, mask)
    kwargs = dict(max_new_tokens=9, min_new_tokens=4, eos_token_id=[eos, 7], pad_token_id=1, do_sample=False)
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    theirs = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
@pytest.mark.parametrize(
    ("name", "search"),
    [
        ("llama-gqa-8q2kv-d64", dict(do_sample=False)),
        ("qwen2-bias", dict(num_beams=3, num_return_sequences=2)),
    ],
    ids=["greedy", "beam3"],
)
def test_repetition_penalty_matches_transformers(name, search, penalty):
    """The penalty counts every token generated (pads included) and each prompt's, its left padding too
    before transformers 5.23, as the installed transformers does; both its scores and the tokens it leads
    to must agree."""
    model = tiny_model(name)
    ids, mask = left_padded_prompts([3, 9], model.config.vocab_size, seed=5)
    kwargs = dict(
        max_new_tokens=10, eos_token_id=frequent_token(model, ids, mask), pad_token_id=0,
        return_dict_in_generate=True, output_scores=True, **search,
    )  # fmt: skip
    ours = _matches_transformers(model, ids, mask, repetition_penalty=penalty, **kwargs)
    unpenalized = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    assert not torch.equal(ours.scores[1], unpenalized.scores[1])  # the penalty changed something


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize(
    ("name", "search"),
    [
        ("llama-gqa-8q2kv-d64", dict(do_sample=False)),
        ("mistral", dict(num_beams=3, num_return_sequences=2)),
    ],
    ids=["greedy", "beam3"],
)
def test_no_repeat_ngram_size_matches_transformers(name, search, size):
    """n-grams are banned over each row's whole history, its left padding included, as transformers bans
    them; scores (with their -inf) and tokens must agree."""
    model = tiny_model(name)
    ids, mask = left_padded_prompts([3, 9], model.config.vocab_size, seed=7)
    ids[0, :2] = ids[0, 2]  # the padding repeats the first prompt token: n-grams across padding and prompt
    kwargs = dict(max_new_tokens=12, eos_token_id=frequent_token(model, ids, mask), pad_token_id=0, **search)
    ours = _matches_transformers(model, ids, mask, no_repeat_ngram_size=size, **kwargs)
    banned = sum(int(step.isneginf().sum()) for step in ours.scores)
    unbanned = xpu_coopt.optimize(model).generate(
        ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    assert banned > sum(int(step.isneginf().sum()) for step in unbanned.scores)  # the option banned something


class _BanLastToken:
    """A caller's logits processor: no row may repeat its last token. Records the shapes it was called
    with."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(input_ids.shape))
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))


@pytest.mark.parametrize(
    "search",
    [dict(do_sample=False), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=20)],
    ids=["greedy", "beam3", "sampling"],
)
def test_callers_logits_processors_run_where_transformers_runs_them(search):
    """After the built-in processors (here the repetition penalty), before the sampling warpers, on each
    row's tokens so far."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([3, 9], model.config.vocab_size, seed=10)
    suppressed = frequent_token(model, ids, mask)

    processors = LogitsProcessorList(
        [SuppressTokensLogitsProcessor([suppressed], device="cpu"), _BanLastToken()]
    )
    kwargs = dict(max_new_tokens=8, repetition_penalty=1.2, pad_token_id=0, **search)
    ours = _matches_transformers(model, ids, mask, seed=0, logits_processor=processors, **kwargs)
    rows = ids.shape[0] * search.get("num_beams", 1)
    # xpu_coopt's run, then transformers': the same rows and lengths at every step
    assert processors[1].calls == [(rows, ids.shape[1] + step) for step in range(8)] * 2
    assert all(bool(step[:, suppressed].isneginf().all()) for step in ours.scores)


class _StopByLength:
    """A caller's stopping criterion: even rows are done at `early` columns, odd ones at `late`."""

    def __init__(self, early: int, late: int) -> None:
        self.early, self.late = early, late

    def __call__(self, input_ids: torch.Tensor, scores) -> torch.Tensor:
        rows, length = input_ids.shape
        even = torch.arange(rows) % 2 == 0
        return torch.where(even, length >= self.early, length >= self.late)


@pytest.mark.parametrize(
    "search",
    [
        dict(do_sample=False),
        dict(do_sample=False, eos_token_id=None),  # no EOS: stopped rows go on unpadded, as in transformers
        dict(do_sample=True, top_k=20),
        dict(num_beams=3, num_return_sequences=2),
    ],
    ids=["greedy", "greedy-without-eos", "sampling", "beam3"],
)
def test_callers_stopping_criteria_end_rows_as_in_transformers(search):
    """Even rows stop at their second token, odd ones at their sixth: the even ones go on padded where an
    EOS id is set, unpadded where none is, as in transformers."""
    from transformers import StoppingCriteriaList

    model = tiny_model("qwen2-bias")
    ids, mask = left_padded_prompts([3, 9], model.config.vocab_size, seed=11)
    kwargs = {"max_new_tokens": 10, "eos_token_id": 1, "pad_token_id": 0, **search}
    criteria = StoppingCriteriaList([_StopByLength(ids.shape[1] + 2, ids.shape[1] + 6)])
    ours = _matches_transformers(model, ids, mask, seed=0, stopping_criteria=criteria, **kwargs)
    if search.get("num_beams", 1) == 1:
        assert ours.sequences.shape[1] == ids.shape[1] + 6


def test_max_time_stops_after_the_first_token_like_transformers():
    model = tiny_model("llama-mha-d64")
    ids, mask = left_padded_prompts([4, 6], model.config.vocab_size)
    kwargs = dict(max_new_tokens=10, max_time=1e-9, pad_token_id=0, do_sample=False)
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    assert ours.shape[1] == ids.shape[1] + 1
    assert torch.equal(ours, model.generate(ids, attention_mask=mask, **kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stop_strings=["."]), "stop_strings needs the model's tokenizer"),
        (dict(max_time=0), "max_time must be > 0"),
        (dict(stopping_criteria=["stop"]), "stopping_criteria must hold callables"),
    ],
)
def test_bad_stopping_arguments_are_errors(kwargs, message):
    model = tiny_model("llama-mha-d64")
    with pytest.raises(ValueError, match=message):
        xpu_coopt.optimize(model).generate(
            left_padded_prompts([4], model.config.vocab_size)[0], max_new_tokens=2, **kwargs
        )


def test_eos_criterion_among_the_callers_criteria_is_an_error():
    from transformers import EosTokenCriteria, StoppingCriteriaList

    model = tiny_model("llama-mha-d64")
    criteria = StoppingCriteriaList([EosTokenCriteria(eos_token_id=1)])
    with pytest.raises(ValueError, match="pass generate\\(\\)'s eos_token_id argument instead"):
        xpu_coopt.optimize(model).generate(
            left_padded_prompts([4], 256)[0], max_new_tokens=2, stopping_criteria=criteria
        )


def test_a_logits_processor_that_an_argument_builds_is_an_error():
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    model = tiny_model("llama-mha-d64")
    ids, _ = left_padded_prompts([4], model.config.vocab_size)
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2)])
    with pytest.raises(ValueError, match="pass generate\\(\\)'s repetition_penalty argument instead"):
        xpu_coopt.optimize(model).generate(ids, max_new_tokens=2, logits_processor=processors)


@pytest.mark.parametrize("min_p", [0.3, 0.6])
def test_min_p_sampling_matches_transformers(min_p):
    """min_p after temperature, top-k and top-p, as transformers orders its warpers."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([4, 8], model.config.vocab_size, seed=8)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=0, top_p=0.95, pad_token_id=0)
    ours = _matches_transformers(model, ids, mask, seed=0, min_p=min_p, **kwargs)
    torch.manual_seed(0)
    without = xpu_coopt.optimize(model).generate(
        ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    kept = sum(int(step.isfinite().sum()) for step in ours.scores)
    assert kept < sum(int(step.isfinite().sum()) for step in without.scores)  # min_p removed tokens


@pytest.mark.parametrize(
    "warpers",
    # top-p and min-p extreme, so that what each warper keeps beyond the EOS ids decides the draw; top-k
    # keeps 3 of each beam's tokens, not the 2 the rule would: with 2 a beam, the draw (2 a beam) would take
    # every candidate, which transformers 5.24 orders by score as beam search does
    [dict(top_k=3), dict(top_k=0, top_p=0.05, temperature=0.7), dict(top_k=0, min_p=0.95, eta_cutoff=0.05)],
    ids=["top-k", "top-p", "min-p-eta"],
)
@pytest.mark.parametrize("eos", [None, "frequent"])
def test_beam_sampling_matches_transformers(warpers, eos):
    """Beam search drawing its candidates: the warpers on log-probabilities, each keeping a token beyond the
    EOS ids, the draw over all beams' accumulated scores; same seed, same beams and scores."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([3, 8], model.config.vocab_size, seed=14)
    eos_token_id = frequent_token(model, ids, mask) if eos else None
    kwargs = dict(
        max_new_tokens=8, do_sample=True, num_beams=3, num_return_sequences=2, eos_token_id=eos_token_id,
        pad_token_id=0, **warpers,
    )  # fmt: skip
    ours = _matches_transformers(model, ids, mask, seed=0, **kwargs)
    torch.manual_seed(0)
    theirs = model.generate(
        ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-5)
    searched = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **{**kwargs, "do_sample": False})
    assert not torch.equal(ours.sequences, searched)  # drawn, not the beam search's own beams


@pytest.mark.parametrize("eos", [None, "frequent"])
def test_beam_sampling_keeps_its_floor_where_top_p_alone_keeps_one_token(eos):
    """Distributions so peaked that top-p alone keeps one token a beam: the floor (2, or 1 + the EOS ids)
    decides what the draw may take, as transformers' min_tokens_to_keep."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([3, 8], model.config.vocab_size, seed=14)
    eos_token_id = frequent_token(model, ids, mask) if eos else None
    kwargs = dict(
        max_new_tokens=6, do_sample=True, num_beams=3, eos_token_id=eos_token_id, pad_token_id=0, top_k=0,
        top_p=1e-4, temperature=0.05,
    )  # fmt: skip
    ours = _matches_transformers(model, ids, mask, seed=0, **kwargs)
    assert all((step.isfinite().sum(dim=-1) == 2).all() for step in ours.scores)  # the floor, not top-p


@pytest.mark.parametrize(
    "warper",
    [dict(typical_p=0.5), dict(epsilon_cutoff=0.006), dict(eta_cutoff=0.02)],
    ids=lambda w: next(iter(w)),
)
def test_typical_epsilon_and_eta_sampling_match_transformers(warper):
    model = tiny_model("qwen2-bias")
    ids, mask = left_padded_prompts([4, 8], model.config.vocab_size, seed=13)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.5, top_k=0, pad_token_id=0)
    ours = _matches_transformers(model, ids, mask, seed=0, **warper, **kwargs)
    torch.manual_seed(0)
    without = xpu_coopt.optimize(model).generate(
        ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    kept = sum(int(step.isfinite().sum()) for step in ours.scores)
    assert kept < sum(int(step.isfinite().sum()) for step in without.scores)  # the warper removed tokens


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_with_the_generation_config_of_qwen2_instruct_matches_transformers(seed):
    """Qwen2-Instruct's generation_config (repetition penalty, temperature, top-k, top-p, sampling) is
    taken from the model, as transformers takes it."""
    model = tiny_model("qwen2-bias")
    for key, value in dict(
        do_sample=True, repetition_penalty=1.05, temperature=0.7, top_k=20, top_p=0.8
    ).items():
        setattr(model.generation_config, key, value)
    ids, mask = left_padded_prompts([4, 8], model.config.vocab_size, seed=6)
    torch.manual_seed(seed)
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    torch.manual_seed(seed)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours, theirs)


SEARCHES = [
    dict(do_sample=False),
    dict(num_beams=3, num_return_sequences=2),
    dict(do_sample=True, top_k=0, temperature=0.8),
]
SEARCH_IDS = ["greedy", "beam3", "sampling"]


def _plain_and_with(model, ids, mask, seed, options, **kwargs):
    """xpu_coopt's output with `options`, checked against transformers', and its output without them (same
    seed): for tests that the options changed something."""
    ours = _matches_transformers(model, ids, mask, seed=seed, **options, **kwargs)
    torch.manual_seed(seed)
    plain = xpu_coopt.optimize(model).generate(
        ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    return ours, plain


@pytest.mark.parametrize("search", SEARCHES, ids=SEARCH_IDS)
def test_sequence_bias_and_bad_words_match_transformers(search):
    """Biases of one token and of sequences whose first tokens each row's history must end with (the
    sequences taken from a plain generation, so that they match), and bad words of one and two tokens,
    an EOS alone among them (never banned, as in transformers)."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([3, 9], model.config.vocab_size, seed=21)
    eos = frequent_token(model, ids, mask)
    kwargs = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=0, **search)
    plain = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **{**kwargs, "do_sample": False})
    first, second, third = (int(token) for token in plain[1, ids.shape[1] : ids.shape[1] + 3])
    options = dict(
        sequence_bias={(7,): 4.0, (11,): -2.5, (first, 13): 6.0, (first, second, 17): 5.0},
        bad_words_ids=[[19], [second, third], [eos]],
    )
    ours, plain = _plain_and_with(model, ids, mask, 0, options, **kwargs)
    assert not torch.equal(ours.scores[0], plain.scores[0])
    assert not any(bool(step[:, 19].isfinite().any()) for step in ours.scores)


@pytest.mark.parametrize("search", SEARCHES, ids=SEARCH_IDS)
def test_suppressed_forced_and_decayed_tokens_match_transformers(search):
    """suppress_tokens at every step and begin_suppress_tokens at the first, EOS forced at the last step,
    its score raised step by step after the second (exponential_decay_length_penalty), invalid values
    removed and the scores renormalized at the end."""
    model = tiny_model("qwen2-bias")
    ids, mask = left_padded_prompts([4, 8], model.config.vocab_size, seed=22)
    eos = frequent_token(model, ids, mask)
    kwargs = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=0, **search)
    options = dict(
        suppress_tokens=[5, 6], begin_suppress_tokens=[eos, 9], forced_eos_token_id=[eos, 3],
        exponential_decay_length_penalty=(2, 1.6), remove_invalid_values=True, renormalize_logits=True,
        no_repeat_ngram_size=1,  # -inf before remove_invalid_values, which makes them finite
    )  # fmt: skip
    ours = _matches_transformers(model, ids, mask, seed=0, **options, **kwargs)
    assert len(ours.scores) > 3  # the decay applied (from the fourth step)
    assert all(not step[:, [5, 6]].isfinite().any() for step in ours.scores)
    assert not ours.scores[0][:, eos].isfinite().any()
    if "num_beams" not in search:  # every row that ran to the last step ends with EOS or token 3
        assert set(ours.sequences[:, -1].tolist()) <= {eos, 3, 0}
    probabilities = ours.scores[1].exp().sum(dim=-1)  # renormalized: log-probabilities
    torch.testing.assert_close(probabilities, torch.ones_like(probabilities))


@pytest.mark.parametrize("search", SEARCHES, ids=SEARCH_IDS)
def test_forced_bos_on_a_one_token_prompt_matches_transformers(search):
    """A forced BOS is the first token of a one-token prompt, and begin_suppress_tokens then applies to the
    second, as transformers counts it."""
    model = tiny_model("llama-mha-d64")
    ids, mask = left_padded_prompts([1, 1], model.config.vocab_size, seed=23)
    kwargs = dict(max_new_tokens=5, pad_token_id=0, **search)
    options = dict(forced_bos_token_id=8, begin_suppress_tokens=[12, 13])
    ours, _ = _plain_and_with(model, ids, mask, 0, options, **kwargs)
    assert set(ours.sequences[:, 1].tolist()) == {8}
    assert not ours.scores[1][:, [12, 13]].isfinite().any()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(bad_words_ids=[[3], []]), "bad_words_ids must be a non-empty list of non-empty lists"),
        (
            dict(bad_words_ids=[[3, 300]]),
            r"bad_words_ids names token ids \[300\] outside the vocabulary of 256",
        ),
        (dict(sequence_bias={(3,): "high"}), "sequence_bias must map non-empty tuples of token ids"),
        (dict(sequence_bias=[[[3, 4], 1.0], [[999], 2.0]]), r"sequence_bias names token ids \[999\]"),
        (dict(suppress_tokens=[-1]), "suppress_tokens must be a list of token ids"),
        (dict(begin_suppress_tokens=[256]), r"begin_suppress_tokens names token ids \[256\]"),
        (dict(forced_bos_token_id=2.0), "forced_bos_token_id must be a token id"),
        (dict(forced_eos_token_id=[1, 400]), r"forced_eos_token_id names token ids \[400\]"),
        (dict(exponential_decay_length_penalty=(2,)), r"must be \(start_index, decay_factor\)"),
        (dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=None), "it needs eos_token_id"),
    ],
)
def test_bad_token_arguments_are_errors_before_the_prompt_runs(options, message, monkeypatch):
    model = tiny_model("llama-mha-d64")
    optimized = xpu_coopt.optimize(model)
    monkeypatch.setattr(optimized.decoder, "forward", None)  # a prefill would call None
    kwargs = {"max_new_tokens": 3, "pad_token_id": 0, "eos_token_id": 1, **options}
    with pytest.raises(ValueError, match=message):
        optimized.generate(left_padded_prompts([4], model.config.vocab_size)[0], **kwargs)


def test_token_arguments_are_taken_from_the_generation_config():
    """A model's generation_config that sets them (sequence_bias in transformers' list form) is honoured,
    as transformers honours it."""
    model = tiny_model("mistral")
    config = model.generation_config
    config.sequence_bias = [[[7], 3.0], [[9, 10], -1.0]]
    config.suppress_tokens = [4]
    config.renormalize_logits = True
    ids, mask = left_padded_prompts([3, 6], model.config.vocab_size, seed=24)
    ours = _matches_transformers(model, ids, mask, max_new_tokens=6, pad_token_id=0, num_beams=2)
    assert not ours.scores[0][:, 4].isfinite().any()


def _allowed_after(batch_id: int, tokens: torch.Tensor) -> list[int]:
    """A prefix_allowed_tokens_fn: a few tokens that depend on the prompt's index and the last token."""
    last = int(tokens[-1])
    return [(last * 7 + 3 * k + batch_id) % 256 for k in range(2 + batch_id)]


@pytest.mark.parametrize(
    "search", [*SEARCHES, dict(do_sample=True, num_return_sequences=2)], ids=[*SEARCH_IDS, "samples2"]
)
def test_prefix_allowed_tokens_fn_matches_transformers(search):
    """Each row may take only what the function allows for its prompt (batch index: the row over
    num_beams, or from transformers 5.24 over max(num_beams, num_return_sequences), as the installed
    release counts it) and its tokens so far."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([3, 7], model.config.vocab_size, seed=25)
    kwargs = dict(max_new_tokens=6, pad_token_id=0, prefix_allowed_tokens_fn=_allowed_after, **search)
    ours = _matches_transformers(model, ids, mask, seed=0, **kwargs)
    for row in ours.sequences:
        for column in range(ids.shape[1], row.shape[0]):
            assert any(int(row[column]) in _allowed_after(prompt, row[:column]) for prompt in range(4))


def test_a_prefix_constraint_that_allows_nothing_is_an_error():
    model = tiny_model("llama-mha-d64")
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn allowed no token for batch index 0"):
        xpu_coopt.optimize(model).generate(
            left_padded_prompts([4], 256)[0],
            max_new_tokens=2,
            pad_token_id=0,
            prefix_allowed_tokens_fn=lambda b, t: [],
        )


@pytest.mark.parametrize(("seed", "length_penalty"), [(1, 2.0), (6, 1.0)])
def test_each_early_stopping_rule_matches_transformers_where_it_decides(seed, length_penalty):
    """Beam search with a frequent EOS, on prompts where early_stopping True (stop at num_beams finished),
    False (the heuristic: the best running beam at its current length) and "never" (at its longest) each
    return other beams: each must give transformers' beams and scores."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([3, 8], model.config.vocab_size, seed=seed)
    kwargs = dict(
        max_new_tokens=10, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0,
        eos_token_id=frequent_token(model, ids, mask), length_penalty=length_penalty,
    )  # fmt: skip
    results = {}
    for rule in (True, False, "never"):
        ours = _matches_transformers(model, ids, mask, early_stopping=rule, **kwargs)
        results[rule] = (ours.sequences, ours.sequences_scores)
    for first, second in ((True, False), (False, "never"), (True, "never")):
        (a, a_scores), (b, b_scores) = results[first], results[second]
        assert a.shape != b.shape or not torch.equal(a, b) or not torch.allclose(a_scores, b_scores), (
            f"early_stopping={first!r} and {second!r} give the same beams: the case decides nothing"
        )
