"""transformers' text-generation pipeline over an optimized model: the text of the pipeline over the model
itself, for plain prompts, batches, beams, sampling and chat messages (run against the newest and the
oldest transformers, as the parity tests)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast, pipeline

import xpu_coopt

PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa-8q2kv-d64")


@pytest.fixture(scope="module")
def tokenizer(model):
    """A tokenizer of one word a token ("w0", "w1", ...) over the model's vocabulary, left padding, and a
    chat template that joins the messages' contents."""
    words = {f"w{index}": index for index in range(model.config.vocab_size)}
    backend = Tokenizer(WordLevel(words, unk_token="w1"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=f"w{PAD}",
        eos_token=f"w{EOS}",
        unk_token="w1",
        padding_side="left",
    )
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    return tokenizer


def _text(count: int, start: int) -> str:
    return " ".join(f"w{token}" for token in range(start, start + count))


@pytest.mark.parametrize(
    ("prompts", "options"),
    [
        ([_text(6, 10)], dict(max_new_tokens=8)),
        ([_text(6, 10), _text(11, 40)], dict(max_new_tokens=8, batch_size=2)),  # left-padded into one batch
        ([_text(9, 100)], dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)),
        ([_text(5, 7)], dict(max_new_tokens=8, return_full_text=False)),
        ([[{"role": "user", "content": _text(4, 20)}, {"role": "assistant", "content": _text(3, 30)},
          {"role": "user", "content": _text(5, 60)}]], dict(max_new_tokens=6)),  # chat messages
    ],
)  # fmt: skip
def test_the_pipeline_over_an_optimized_model_gives_the_text_of_the_model(model, tokenizer, prompts, options):
    options = dict(do_sample=False, eos_token_id=None, **options)  # random weights: go the whole length
    expected = pipeline("text-generation", model=model, tokenizer=tokenizer)(prompts, **options)
    optimized = xpu_coopt.optimize(model)
    assert pipeline("text-generation", model=optimized, tokenizer=tokenizer)(prompts, **options) == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_a_sampling_pipeline_draws_the_text_of_the_model_with_the_same_seed(model, tokenizer, seed):
    options = dict(do_sample=True, temperature=0.8, top_k=30, max_new_tokens=8, eos_token_id=None)
    texts = []
    for subject in (model, xpu_coopt.optimize(model)):
        torch.manual_seed(seed)
        texts.append(pipeline("text-generation", model=subject, tokenizer=tokenizer)(_text(6, 50), **options))
    assert texts[0] == texts[1]
