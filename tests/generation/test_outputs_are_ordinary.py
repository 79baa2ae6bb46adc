"""What generate() and forward() return are ordinary tensors, as transformers' are: the caller may write
to them and use them in autograd (generation itself runs in inference mode)."""

from __future__ import annotations

import pytest
from helpers import left_padded_prompts, tiny_model

import xpu_coopt


@pytest.fixture(scope="module")
def models():
    model = tiny_model("llama-gqa-8q2kv-d64")
    return model, xpu_coopt.optimize(model)


@pytest.mark.parametrize(
    "search",
    [dict(), dict(do_sample=True), dict(num_beams=2), dict(prompt_lookup_num_tokens=2)],
    ids=["greedy", "sampling", "beams", "prompt-lookup"],
)
def test_generate_returns_tensors_the_caller_can_write_and_train_on(models, search):
    model, optimized = models
    ids, _ = left_padded_prompts([8], model.config.vocab_size)
    out = optimized.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True,
                             output_logits=True, **search)  # fmt: skip
    tensors = [out.sequences, *out.scores, *out.logits]
    if out.sequences_scores is not None:
        tensors.append(out.sequences_scores)
    assert not any(tensor.is_inference() for tensor in tensors)
    sequences = out.sequences
    sequences[0, -1] = 3  # an inference tensor refuses this outside inference mode
    model(sequences, labels=sequences).loss.backward()  # ... and refuses to be saved for backward
    model.zero_grad(set_to_none=True)


def test_forward_returns_ordinary_logits(models):
    model, optimized = models
    ids, mask = left_padded_prompts([5, 8], model.config.vocab_size)
    prefill = optimized(ids, mask)
    step = optimized(prefill.logits[:, -1].argmax(-1, keepdim=True), cache=prefill.cache)
    last = optimized(ids, mask, logits_to_keep=1)
    for logits in (prefill.logits, step.logits, last.logits):
        assert not logits.is_inference()
        logits.add_(1.0)
    labelled = optimized(ids, mask, labels=ids)
    assert not labelled.loss.is_inference()
