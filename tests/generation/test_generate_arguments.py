"""generate()'s arguments: transformers' names and defaults, and a clear error for bad ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import left_padded_prompts, tiny_model
from transformers import GenerationConfig, TextStreamer

import xpu_coopt


@pytest.fixture(scope="module")
def optimized():
    return xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(num_beams=0), ValueError, "num_beams must be an integer >= 1"),
        (dict(guidance_scale=1.5), TypeError, "unsupported arguments \\['guidance_scale'\\]"),
        (dict(do_sample=True, typical_p=0.0), ValueError, "typical_p must be in \\(0, 1\\]"),
        (dict(do_sample=True, eta_cutoff=1.0), ValueError, "eta_cutoff must be in \\[0, 1\\)"),
        (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size must be an integer >= 0"),
        (dict(do_sample=True, min_p=1.5), ValueError, "min_p must be in \\[0, 1\\]"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
        (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences"),
        (dict(num_return_sequences=2), ValueError, "needs sampling"),
        (dict(do_sample=True, num_return_sequences=0), ValueError, "num_return_sequences must be an integer"),
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be at least 1"),
        (dict(use_cache=False), ValueError, "use_cache=False"),
        (
            dict(inputs_embeds=torch.zeros((1, 8, 64))),
            TypeError,
            "token ids \\(input_ids\\), not inputs_embeds",
        ),
        (dict(inputs=torch.ones((1, 8), dtype=torch.long)), TypeError, "the prompt twice"),
        (dict(max_new_tokens=2.5), ValueError, "max_new_tokens must be an integer, got 2.5"),
        (dict(num_beams="2"), ValueError, "num_beams must be an integer, got '2'"),
        (dict(top_k=True), ValueError, "top_k must be an integer, got True"),
        (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature must be a number, got nan"),
        (dict(do_sample=True, top_p="0.5"), ValueError, "top_p must be a number"),
        (
            dict(logits_processor=[lambda ids, scores: None]),
            ValueError,
            "returned NoneType: a processor returns",
        ),
        (dict(logits_processor=[lambda ids, scores: scores[:, :5]]), ValueError, "returned \\(1, 5\\)"),
        (
            dict(stopping_criteria=[lambda ids, scores: "no"]),
            ValueError,
            "returned 'no': a criterion returns",
        ),
        (
            dict(stopping_criteria=[lambda ids, scores: torch.ones(3, dtype=torch.bool)]),
            ValueError,
            "one flag per row \\(1\\)",
        ),
    ],
)
def test_bad_generate_arguments(optimized, kwargs, error, message):
    ids, _ = left_padded_prompts([8], 256)
    with pytest.raises(error, match=message):
        optimized.generate(ids, **{"max_new_tokens": 2, **kwargs})


def test_numpy_numbers_are_taken_as_transformers_takes_them(optimized):
    ids, _ = left_padded_prompts([8], 256)
    expected = optimized.generate(ids, max_new_tokens=3, num_beams=2, length_penalty=0.5)
    given = dict(max_new_tokens=np.int64(3), num_beams=np.int32(2), length_penalty=np.float32(0.5))
    assert torch.equal(optimized.generate(ids, **given), expected)


@pytest.mark.parametrize("search", [dict(), dict(num_beams=2)], ids=["greedy", "beams"])
@pytest.mark.parametrize("stop", [False, True])
def test_a_stopping_criterion_may_return_a_python_bool(optimized, search, stop):
    """As transformers' StoppingCriteriaList takes it: False stops no row, True every row."""
    ids, mask = left_padded_prompts([5, 8], 256)
    settings = dict(
        attention_mask=mask, max_new_tokens=4, stopping_criteria=[lambda ids, scores: stop], **search
    )
    expected = tiny_model("llama-gqa-8q2kv-d64").generate(ids, pad_token_id=0, **settings)
    assert expected.shape[1] == ids.shape[1] + (1 if stop else 4)
    assert torch.equal(optimized.generate(ids, **settings), expected)


def test_the_prompt_goes_by_either_of_transformers_names(optimized):
    """input_ids, or inputs as transformers' generate() names its first argument; neither is an error."""
    ids, mask = left_padded_prompts([3, 8], 256)
    expected = optimized.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(optimized.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3), expected)
    assert torch.equal(optimized.generate(inputs=ids, attention_mask=mask, max_new_tokens=3), expected)
    with pytest.raises(TypeError, match="needs the prompt's token ids"):
        optimized.generate(attention_mask=mask, max_new_tokens=3)


def test_unsupported_generation_config_field_is_an_error():
    model = tiny_model("llama-mha-d64")
    model.generation_config.guidance_scale = 1.5
    with pytest.raises(ValueError, match=r"the model's generation_config sets .*guidance_scale"):
        xpu_coopt.optimize(model).generate(left_padded_prompts([4], 256)[0], max_new_tokens=2)


@pytest.mark.parametrize(
    ("prompt_len", "lengths", "config_max_length"),
    [
        (4, {}, None),  # nothing set: 20 new tokens
        (30, {}, None),  # a prompt longer than 20: still 20 new tokens
        (245, {}, None),  # the default's total capped at max_position_embeddings (256): 11 new tokens
        (4, {"max_length": 12}, None),  # max_length counts the prompt
        (4, {}, 15),  # so does the model's generation_config's
        (4, {}, 20),  # transformers 4's default value: 20 new tokens there, 20 in all from transformers 5 on
        (4, {"max_length": 20}, None),  # passed: 20 in all
        (4, {"generation_config": GenerationConfig(max_length=9, pad_token_id=0)}, None),
    ],
)
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")  # transformers', on its side
def test_the_generated_length_follows_transformers(prompt_len, lengths, config_max_length):
    """Without max_new_tokens, generate() stops where transformers' does: at max_length (passed, in a
    passed generation_config or in the model's) or, with none set, after 20 new tokens."""
    model = tiny_model("llama-mha-d64")
    if config_max_length is not None:
        model.generation_config.max_length = config_max_length
    ids, _ = left_padded_prompts([prompt_len], 256)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, **lengths)
    ours = xpu_coopt.optimize(model).generate(ids, **kwargs)
    theirs = model.generate(ids, **kwargs)
    assert ours.shape[1] > prompt_len
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(("prompt_len", "lengths"), [(8, {"max_length": 8}), (256, {})])
def test_a_max_length_that_leaves_no_new_token_is_an_error(optimized, prompt_len, lengths):
    """max_length at most the prompt's length, passed or the default's cap at max_position_embeddings."""
    ids, _ = left_padded_prompts([prompt_len], 256)
    with pytest.raises(ValueError, match=r"input_ids hold \d+ tokens .* no room for a new token"):
        optimized.generate(ids, **lengths)


@pytest.mark.parametrize(
    "overrides", [{}, {"num_beams": 2, "max_new_tokens": 4}], ids=["config", "overridden"]
)
def test_a_generation_config_passed_to_generate_overrides_the_models(overrides):
    """The passed config's fields override the model's (its max_new_tokens), the model's fill the fields it
    leaves unset (num_beams 3), generate()'s other arguments override both, as in transformers."""
    model = tiny_model("llama-mha-d64")
    model.generation_config.num_beams = 3
    model.generation_config.max_new_tokens = 9
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=1.3, pad_token_id=0)
    ids, _ = left_padded_prompts([4], 256)
    ours = xpu_coopt.optimize(model).generate(ids, generation_config=config, **overrides)
    assert ours.shape[1] == 4 + overrides.get("max_new_tokens", 6)
    assert torch.equal(ours, model.generate(ids, generation_config=config, **overrides))


def test_a_generation_config_with_an_unsupported_field_is_an_error():
    model = tiny_model("llama-mha-d64")
    with pytest.raises(
        ValueError, match=r"the generation_config passed to generate\(\) sets .*guidance_scale"
    ):
        xpu_coopt.optimize(model).generate(
            left_padded_prompts([4], 256)[0], generation_config=GenerationConfig(guidance_scale=1.5)
        )


def test_generation_config_defaults_are_honoured():
    model = tiny_model("llama-mha-d64")
    model.generation_config.num_beams = 3
    model.generation_config.max_new_tokens = 5
    ids, _ = left_padded_prompts([4], 256)
    ours = xpu_coopt.optimize(model).generate(ids, pad_token_id=0)
    assert torch.equal(ours, model.generate(ids, pad_token_id=0))


class _Collector:
    """The TextStreamer interface: put(token ids), end()."""

    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended = True


def test_streamer_receives_prompt_then_each_token(optimized):
    ids, _ = left_padded_prompts([5], 256)
    streamer = _Collector()
    out = optimized.generate(ids, max_new_tokens=6, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == ids[0].tolist()
    assert [token for chunk in streamer.chunks[1:] for token in chunk] == out[0, 5:].tolist()


def test_text_streamer_prints_the_generation(stories_model, stories_tokenizer, capsys):
    class Tokenizer:  # TextStreamer needs only decode()
        def decode(self, ids, **kwargs):
            return stories_tokenizer.decode(list(ids))

    ids = torch.tensor([stories_tokenizer.encode("Once upon a time")])
    xpu_coopt.optimize(stories_model).generate(
        ids, max_new_tokens=20, streamer=TextStreamer(Tokenizer(), skip_prompt=True)
    )
    assert len(capsys.readouterr().out.split()) >= 5


@pytest.mark.parametrize(
    "search", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)], ids=["beams", "samples"]
)
def test_streamer_of_several_sequences_is_an_error(optimized, search):
    with pytest.raises(ValueError, match="streamer supports one sequence"):
        optimized.generate(
            left_padded_prompts([5], 256)[0], max_new_tokens=3, streamer=_Collector(), **search
        )
