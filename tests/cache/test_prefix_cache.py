"""generate(past_key_values=PrefixCache()): a conversation's K/V kept between calls, each call prefilling
only its prompt's new tokens. The oracle: transformers' generate on the whole prompt, and the optimized
model's own prefill of the whole prompt."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close, stories_prompt

import xpu_coopt
from xpu_coopt import KVScales, PrefixCache
from xpu_coopt.cache.held import HeldKV, request_kv
from xpu_coopt.ops import fp8

GREEDY = dict(max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)


def _next_turn(tokenizer, previous: torch.Tensor, text: str) -> torch.Tensor:
    """The previous generation's tokens followed by `text`'s (no BOS): the next prompt of a conversation."""
    return torch.cat((previous, torch.tensor([tokenizer.encode(text, bos=False)], dtype=torch.long)), dim=1)


# Triton's interpreter (30 s a conversation) with the paged cache alone: its prompt writes go through the
# block table.
@pytest.mark.parametrize(
    ("backend", "kv_cache"),
    [("torch", "segment"), ("torch", "paged"), ("sycl", "segment"), ("sycl", "paged"), ("triton", "paged")],
)
def test_a_conversation_prefills_only_its_new_tokens_and_matches_transformers(
    stories_model, stories_tokenizer, backend, kv_cache
):
    """Three turns, greedy: each prompt is the last generation and a few more tokens. Each call reuses every
    token the last one ran (its prompt and its reply but the last token, which no forward ran) and
    generates what transformers generates from the whole prompt."""
    model = xpu_coopt.optimize(stories_model, backend=backend, kv_cache=kv_cache)
    prefix_cache = PrefixCache()
    prompt, expected_reuse = stories_prompt(stories_tokenizer), 0
    greedy = dict(GREEDY, max_new_tokens=6)  # few decode steps: Triton's interpreter runs each slowly
    for next_text in [" The sun was hot.", " Then Lily saw a cat.", ""]:
        output = model.generate(prompt, past_key_values=prefix_cache, **greedy)
        assert prefix_cache.reused_tokens == expected_reuse
        assert torch.equal(output, stories_model.generate(prompt, **greedy))
        expected_reuse = output.shape[1] - 1
        prompt = _next_turn(stories_tokenizer, output, next_text)
        assert torch.equal(prefix_cache.tokens, output[0, :-1])


def _decoded(model, held: HeldKV) -> HeldKV:
    """Held K/V in the model's dtype: FP8 codes decoded with their rows' scales or the model's static ones."""
    if held.keys.dtype != torch.uint8:
        return held
    static = model.static_scales or (None, None)
    decoded = []
    for codes, scales, layer_scales in zip(
        (held.keys, held.values), (held.key_scales, held.value_scales), static, strict=True
    ):
        if scales is None:  # one scale per layer
            scales = layer_scales.view(-1, 1, 1).expand(codes.shape[:-1])
        decoded.append(fp8.decode(codes, scales, model.kv_dtype, model.dtype))
    return HeldKV(*decoded)


@pytest.mark.parametrize(
    ("backend", "kv_cache", "kv_dtype"),
    [("torch", "segment", "auto"), ("torch", "segment", "fp8_e4m3"), ("torch", "segment", "fp8_e5m2"),
     ("torch", "paged", "fp8_e4m3"), ("torch", "segment", "fp8_e4m3-static"), ("torch", "paged", "fp8_e5m2-static"),
     ("sycl", "segment", "auto"), ("sycl", "segment", "fp8_e4m3"), ("sycl", "paged", "fp8_e5m2"),
     ("sycl", "segment", "fp8_e4m3-static")],
)  # fmt: skip
def test_a_prefill_over_reused_tokens(stories_model, stories_tokenizer, backend, kv_cache, kv_dtype):
    """The K/V are held as the last generation's cache stored them (FP8: its codes and per-row scales, half
    the bytes of the model's dtype or less) and written into the new cache as held. The new tokens attend
    to them decoded: their logits are those of a 16-bit-cache model's prefill over the same K/V and, in a
    16-bit cache, of a prefill of the whole prompt, up to rounding."""
    kv_dtype, _, static = kv_dtype.partition("-")
    layers = stories_model.config.num_hidden_layers
    kv_scales = KVScales(key_amax=(6.0,) * layers, value_amax=(3.0,) * layers) if static else None
    model = xpu_coopt.optimize(
        stories_model, backend=backend, kv_cache=kv_cache, kv_dtype=kv_dtype, kv_scales=kv_scales
    )
    prefix_cache = PrefixCache()
    first = model.generate(stories_prompt(stories_tokenizer), past_key_values=prefix_cache, **GREEDY)
    prompt = _next_turn(stories_tokenizer, first, " They played all day.")
    reused = first.shape[1] - 1
    spec, held = model.spec, prefix_cache.kv
    element = model.dtype.itemsize if kv_dtype == "auto" else 1
    scale = 2 if kv_dtype != "auto" and not static else 0  # a bfloat16 scale a row
    row_bytes = spec.head_dim * element + scale
    assert prefix_cache.nbytes() == 2 * layers * reused * spec.num_kv_heads * row_bytes
    logits, session = model.prefill(prompt, max_new_tokens=1, prefix_cache=prefix_cache)
    assert prefix_cache.reused_tokens == reused
    for written, kept in zip(request_kv(session.cache, reused)._fields(), held._fields(), strict=True):
        assert (written is None and kept is None) or torch.equal(written, kept)
    if kv_dtype == "auto":
        expected, _ = model.prefill(prompt, max_new_tokens=1)
    else:  # the same K/V held for a model with a 16-bit cache
        same_kv = PrefixCache()
        same_kv.tokens, same_kv.kv = prefix_cache.tokens, _decoded(model, held)
        model_16_bit = xpu_coopt.optimize(stories_model, backend=backend, kv_cache=kv_cache)
        expected, _ = model_16_bit.prefill(prompt, max_new_tokens=1, prefix_cache=same_kv)
        assert same_kv.reused_tokens == reused
    assert_close(logits, expected, torch.float32)


def test_beams_reuse_the_prompt_and_a_departing_prompt_reuses_what_matches(stories_model, stories_tokenizer):
    """Beam search keeps the prompt's K/V (its beams share them) and not a reply's. A prompt that departs
    from the held tokens reuses those before the first that differs."""
    model = xpu_coopt.optimize(stories_model, backend="torch")
    prefix_cache = PrefixCache()
    prompt = stories_prompt(stories_tokenizer)
    beams = dict(GREEDY, num_beams=3)
    output = model.generate(prompt, cache=prefix_cache, **beams)  # transformers 5.24's name
    assert torch.equal(prefix_cache.tokens, prompt[0])
    longer = _next_turn(stories_tokenizer, output, " The end.")
    assert torch.equal(model.generate(longer, past_key_values=prefix_cache, **beams),
                       stories_model.generate(longer, **beams))  # fmt: skip
    assert prefix_cache.reused_tokens == prompt.shape[1]
    # Another ending of the same prompt: the held tokens part from it where its ending starts.
    other = _next_turn(stories_tokenizer, prompt, " there was a big dog.")
    assert torch.equal(model.generate(other, past_key_values=prefix_cache, **GREEDY),
                       stories_model.generate(other, **GREEDY))  # fmt: skip
    differs = int((other[0, : longer.shape[1]] != longer[0, : other.shape[1]]).nonzero()[0, 0])
    assert prefix_cache.reused_tokens == differs
    # The same prompt again: every token but the last is reused (its logits choose the first new token).
    again = model.generate(other, past_key_values=prefix_cache, **GREEDY)
    assert prefix_cache.reused_tokens == other.shape[1] - 1 and torch.equal(
        again, stories_model.generate(other, **GREEDY)
    )


# The turn whose end finds the first tokens' K/V gone: the segment cache's ring (the window's 13 columns)
# wraps over them in the first reply; the paged cache hands no block on before its second block has
# passed the window, but the second turn's prompt is longer than the window, whose first columns no cache
# keeps.
@pytest.mark.parametrize(("kv_cache", "first_emptied"), [("segment", 0), ("paged", 1)])
def test_a_conversation_past_the_sliding_window_warns_and_starts_over(
    stories_window_model, stories_tokenizer, kv_cache, first_emptied
):
    """A window on every layer lets go of the first tokens' K/V: the PrefixCache is then emptied with a
    warning, and the next call prefills its whole prompt; every turn matches transformers."""
    model = xpu_coopt.optimize(stories_window_model, backend="torch", kv_cache=kv_cache)
    prefix_cache = PrefixCache()
    prompt, expected_reuse = stories_prompt(stories_tokenizer), 0
    for turn in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = model.generate(prompt, past_key_values=prefix_cache, **GREEDY)
        assert prefix_cache.reused_tokens == expected_reuse
        assert torch.equal(output, stories_window_model.generate(prompt, **GREEDY))
        emptied = any("outgrown the model's sliding window" in str(w.message) for w in caught)
        assert emptied == (turn >= first_emptied)
        assert len(prefix_cache) == (0 if emptied else output.shape[1] - 1)
        expected_reuse = len(prefix_cache)
        prompt = _next_turn(stories_tokenizer, output, " Yes.")


def test_bad_past_key_values(stories_model, stories_tokenizer):
    from transformers import DynamicCache

    model = xpu_coopt.optimize(stories_model, backend="torch")
    prompt = stories_prompt(stories_tokenizer)
    with pytest.raises(
        TypeError, match=r"past_key_values must be an xpu_coopt\.PrefixCache, not DynamicCache"
    ):
        model.generate(prompt, past_key_values=DynamicCache(), **GREEDY)
    with pytest.raises(TypeError, match=r"cache must be an xpu_coopt\.PrefixCache, not dict"):
        model.generate(prompt, cache={}, **GREEDY)
    prefix_cache = PrefixCache()
    with pytest.raises(TypeError, match="both cache and past_key_values"):
        model.generate(prompt, cache=prefix_cache, past_key_values=prefix_cache, **GREEDY)
    with pytest.raises(ValueError, match="one prompt per generate\\(\\) call, got a batch of 2"):
        model.generate(prompt.repeat(2, 1), past_key_values=prefix_cache, **GREEDY)
    mask = torch.ones_like(prompt)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="a prompt without padding"):
        model.generate(prompt, attention_mask=mask, past_key_values=prefix_cache, **GREEDY)
    model.generate(prompt, past_key_values=prefix_cache, **GREEDY)
    other = xpu_coopt.optimize(stories_model, backend="torch")
    with pytest.raises(ValueError, match="holds another model's K/V"):
        other.generate(prompt, past_key_values=prefix_cache, **GREEDY)
    assert prefix_cache.nbytes() > 0
    prefix_cache.clear()
    assert len(prefix_cache) == 0 and prefix_cache.nbytes() == 0


def test_a_cache_continues_only_from_kv_stored_as_it_stores_them(stories_model, stories_tokenizer):
    """SegmentKVCache.continue_from(), which PrefixCache feeds: K/V of another format (16-bit for an FP8
    cache), or of as many tokens as the prompt or more, are errors."""
    prefix_cache = PrefixCache()
    first = xpu_coopt.optimize(stories_model).generate(
        stories_prompt(stories_tokenizer), past_key_values=prefix_cache, **GREEDY
    )
    prompt_len, start = first.shape[1] + 4, torch.zeros(1, dtype=torch.int32)
    fp8_model = xpu_coopt.optimize(stories_model, kv_dtype="fp8_e4m3")
    fp8_cache = fp8_model.decoder.new_cache(start, prompt_len, 1, 1, "fp8_e4m3")
    with pytest.raises(ValueError, match=r"K/V stored as this cache stores them \(fp8_e4m3\)"):
        fp8_cache.continue_from(prefix_cache.kv)
    model = xpu_coopt.optimize(stories_model)
    short_cache = model.decoder.new_cache(start, len(prefix_cache), 1, 1, "auto")
    with pytest.raises(ValueError, match=rf"K/V of 1 to {len(prefix_cache) - 1} of the prompt's"):
        short_cache.continue_from(prefix_cache.kv)
