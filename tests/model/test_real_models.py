"""Real weights: stories260K (llama2.c format) and SmolLM2-135M-Instruct (GGUF), against transformers."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import (
    TINYSTORIES_TEXT,
    assert_logits_close,
    require_data,
    stories_prompt,
    unequal_stories_prompts,
)

import xpu_coopt
from xpu_coopt import checkpoints
from xpu_coopt.model.spec import model_spec


def test_stories260k_greedy_text_matches_transformers(stories_model, stories_tokenizer):
    ids = stories_prompt(stories_tokenizer)
    kwargs = dict(max_new_tokens=60, do_sample=False, eos_token_id=2, pad_token_id=0)
    ours = xpu_coopt.optimize(stories_model).generate(ids, **kwargs)
    assert torch.equal(ours, stories_model.generate(ids, **kwargs))
    text = stories_tokenizer.decode(ours[0].tolist())
    assert text.startswith("Once upon a time") and len(text.split()) > 20


def test_stories260k_beam_search_matches_transformers(stories_model, stories_tokenizer):
    ids = stories_prompt(stories_tokenizer)
    kwargs = dict(max_new_tokens=40, num_beams=4, num_return_sequences=2, eos_token_id=2, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)  # fmt: skip
    ours = xpu_coopt.optimize(stories_model).generate(ids, **kwargs)
    theirs = stories_model.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-5)


SEARCHES = pytest.mark.parametrize(
    "search", [dict(do_sample=False), dict(num_beams=4, num_return_sequences=2)], ids=["greedy", "beam4"]
)


def _over_unequal_prompts(generate, tokenizer, search) -> torch.Tensor:
    """generate's tokens for unequal (left-padded) stories prompts, 40 new at most, under `search`."""
    ids, mask = unequal_stories_prompts(tokenizer)
    return generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=2, pad_token_id=0, **search)


def _matches_transformers_over_unequal_prompts(model, tokenizer, search) -> torch.Tensor:
    """xpu_coopt's tokens equal transformers' over unequal stories prompts; returns them."""
    ours = _over_unequal_prompts(xpu_coopt.optimize(model).generate, tokenizer, search)
    assert torch.equal(ours, _over_unequal_prompts(model.generate, tokenizer, search))
    return ours


def _plain_stories_tokens(stories_model, tokenizer, search) -> torch.Tensor:
    return _over_unequal_prompts(xpu_coopt.optimize(stories_model).generate, tokenizer, search)


@SEARCHES
def test_stories260k_with_a_sliding_window_matches_transformers(
    stories_model, stories_window_model, stories_tokenizer, search
):
    """A real model with a sliding window shorter than its sequences (Mistral's attention)."""
    ours = _matches_transformers_over_unequal_prompts(stories_window_model, stories_tokenizer, search)
    # the window matters here: the same weights without it write other tokens
    assert not torch.equal(_plain_stories_tokens(stories_model, stories_tokenizer, search), ours)


@SEARCHES
def test_stories260k_with_a_layer_without_rope_matches_transformers(
    stories_model, stories_nope_model, stories_tokenizer, search
):
    """A real model with a layer that does not rotate (SmolLM3's NoPE layers), whose tokens are not those
    of the same weights with rope on every layer."""
    spec = model_spec(stories_nope_model.config, "SmolLM3ForCausalLM")
    assert spec.layer_rope == (True, True, True, False, True)
    ours = _matches_transformers_over_unequal_prompts(stories_nope_model, stories_tokenizer, search)
    assert not torch.equal(_plain_stories_tokens(stories_model, stories_tokenizer, search), ours)


@SEARCHES
def test_stories260k_with_query_and_key_norms_matches_transformers(
    stories_qwen3_model, stories_tokenizer, search
):
    """A real model whose attention RMS-normalizes each query and key head before rope (Qwen3's)."""
    _matches_transformers_over_unequal_prompts(stories_qwen3_model, stories_tokenizer, search)


def test_stories260k_loader_gives_the_published_perplexity(stories_model, stories_tokenizer):
    # The llama2.c loader permutes W_q/W_k for rotate-half RoPE; a wrong permutation ruins perplexity.
    text = require_data(TINYSTORIES_TEXT).read_text()[:4000]
    ids = torch.tensor([stories_tokenizer.encode(text)[:512]])
    logits = xpu_coopt.optimize(stories_model)(ids).logits[0].float()
    perplexity = math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item())
    assert 3.5 < perplexity < 6.0, perplexity  # data README: about 4.5; a random model: about 518


def test_smollm2_loads_from_its_kept_copy_as_from_its_gguf(tmp_path, monkeypatch, capsys):
    """The first load converts the GGUF and keeps a float32 copy in the disk cache; later ones read the
    copy alone: the same weights in float32 and cast to bfloat16, the same spec, generation config and
    tokenizer."""
    monkeypatch.setenv("XPU_COOPT_CACHE", str(tmp_path))
    converted, gguf_tokenizer = checkpoints.load_smollm2(torch.float32)
    assert "keeping a float32 copy" in capsys.readouterr().err
    assert [path.parent.name for path in tmp_path.glob("*/*")] == ["models"]  # no scratch folder left

    def no_gguf(*args):
        raise AssertionError("a later load read the GGUF")

    monkeypatch.setattr(checkpoints, "load_gguf", no_gguf)
    texts = ["Hello world", " café\n\n😀 <|im_end|>  spaces"]
    chat = [{"role": "user", "content": "What is 2+2?"}]
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = checkpoints.load_smollm2(dtype)
        assert "keeping a float32 copy" not in capsys.readouterr().err
        expected = converted.state_dict()
        assert model.state_dict().keys() == expected.keys()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, expected[name].to(dtype)), name
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
        assert type(model) is type(converted)
        assert model_spec(model.config, "LlamaForCausalLM") == model_spec(
            converted.config, "LlamaForCausalLM"
        )
        assert model.generation_config.to_diff_dict() == converted.generation_config.to_diff_dict()
        for text in texts:
            assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
        assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == (
            gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        )
        for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert getattr(tokenizer, special) == getattr(gguf_tokenizer, special)


def test_a_damaged_smollm2_copy_is_converted_again(smollm2_fp32, tmp_path, monkeypatch):
    """A copy cut short, deleted or emptied is found before it is read: a warning names it, the GGUF is
    converted again (here: the conversion the fixture made) and the copy kept anew."""
    monkeypatch.setenv("XPU_COOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(checkpoints, "load_gguf", lambda *args: smollm2_fp32)
    checkpoints.load_smollm2(torch.float32)
    (copy,) = (tmp_path / "models").iterdir()
    weights = copy / "model.safetensors"
    damages = {
        "model.safetensors holds 100 bytes": lambda: os.truncate(weights, 100),
        "model.safetensors is missing": weights.unlink,
        "config.json holds 0 bytes": lambda: (copy / "config.json").write_text(""),
    }
    for found, harm in damages.items():
        harm()
        with pytest.warns(UserWarning, match=f"{copy} is damaged \\({found}"):
            checkpoints.load_smollm2(torch.float32)
        monkeypatch.setattr(checkpoints, "load_gguf", None)  # the copy made again serves the next load
        model, _ = checkpoints.load_smollm2(torch.float32)
        assert torch.equal(model.lm_head.weight, smollm2_fp32[0].lm_head.weight)
        monkeypatch.setattr(checkpoints, "load_gguf", lambda *args: smollm2_fp32)


def test_a_cache_that_cannot_keep_the_smollm2_copy_is_a_warning(smollm2_fp32, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.warns(UserWarning, match="could not keep a copy of the model in .*the next load converts"):
        checkpoints.keep_copy(*smollm2_fp32, not_a_folder / "models" / "copy")


@pytest.fixture(scope="module")
def smollm2_chat(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    texts = ["The capital of France is", "def fibonacci(n):\n    "]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return model, batch["input_ids"], batch["attention_mask"]


def test_smollm2_greedy_batch_matches_transformers(smollm2_chat):
    model, ids, mask = smollm2_chat
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=2)
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, model.generate(ids, attention_mask=mask, **kwargs))


def test_smollm2_beam4_matches_transformers(smollm2_chat):
    model, ids, mask = smollm2_chat
    kwargs = dict(
        max_new_tokens=12, num_beams=4, pad_token_id=2, return_dict_in_generate=True, output_scores=True
    )
    ours = xpu_coopt.optimize(model).generate(ids[:1], attention_mask=mask[:1], **kwargs)
    theirs = model.generate(ids[:1], attention_mask=mask[:1], **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-5)


def test_smollm2_prompt_lookup_matches_transformers_greedy(smollm2_fp32):
    """A chat request to repeat a passage: the reply quotes it, drafts hit, and the tokens are greedy
    decoding's (SmolLM2: 9 query heads on 3 KV heads)."""
    model, tokenizer = smollm2_fp32
    passage = "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all day long."
    request = [{"role": "user", "content": f"Repeat this text exactly: {passage}"}]
    ids = tokenizer.apply_chat_template(
        request, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    kwargs = dict(max_new_tokens=24, do_sample=False)
    output = xpu_coopt.optimize(model).generate(
        ids["input_ids"], prompt_lookup_num_tokens=8, return_dict_in_generate=True, **kwargs
    )
    assert torch.equal(output.sequences, model.generate(ids["input_ids"], **kwargs))
    new_tokens = output.sequences.shape[1] - ids["input_ids"].shape[1]
    assert output.accepted_drafts > 0 and output.decode_steps + output.accepted_drafts in (
        new_tokens - 1,
        new_tokens,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_smollm2_prompt_lookup_sampling_draws_transformers_tokens(smollm2_fp32, seed):
    """Sampling with top-p over SmolLM2's 49k-token vocabulary (whose check of each draft on uniform logits
    cuts some): one seed, transformers' prompt-lookup tokens."""
    model, tokenizer = smollm2_fp32
    passage = "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all day long."
    request = [{"role": "user", "content": f"Repeat this text exactly: {passage}"}]
    ids = tokenizer.apply_chat_template(
        request, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    kwargs = dict(max_new_tokens=24, do_sample=True, top_p=0.9, temperature=0.8, prompt_lookup_num_tokens=8)
    torch.manual_seed(seed)
    expected = model.generate(ids["input_ids"], **kwargs)
    torch.manual_seed(seed)
    output = xpu_coopt.optimize(model).generate(ids["input_ids"], return_dict_in_generate=True, **kwargs)
    assert torch.equal(output.sequences, expected)
    assert output.accepted_drafts > 0


@pytest.mark.parametrize("search", [dict(do_sample=False), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_smollm2_stop_strings_match_transformers(smollm2_chat, smollm2_fp32, search):
    """stop_strings end each row where its text first holds one (transformers' StopStringCriteria, which
    reads the tokenizer's vocabulary): "Paris." ends the first prompt's row, "return" the second's."""
    model, ids, mask = smollm2_chat
    tokenizer = smollm2_fp32[1]
    kwargs = dict(
        max_new_tokens=20, pad_token_id=2, stop_strings=["Paris.", "return"], tokenizer=tokenizer, **search
    )
    ours = xpu_coopt.optimize(model).generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, model.generate(ids, attention_mask=mask, **kwargs))
    texts = tokenizer.batch_decode(ours[:, ids.shape[1] :], skip_special_tokens=True)
    assert texts[0].strip() == "Paris." and texts[1].rstrip().endswith("return"), texts


def test_smollm2_bf16_logits_close_to_transformers_bf16(smollm2_chat):
    model, ids, mask = smollm2_chat
    bf16 = type(model)(model.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = bf16(ids, attention_mask=mask, position_ids=positions).logits
    ours = xpu_coopt.optimize(bf16)(ids, mask).logits
    for row in range(ids.shape[0]):
        valid = mask[row].bool()
        assert_logits_close(ours[row, valid], expected[row, valid], torch.bfloat16)
