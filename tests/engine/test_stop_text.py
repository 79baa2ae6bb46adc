"""StopText, the server's incremental detokenizer: streamed pieces joined equal the whole output decoded
at once, cut at the earliest stop string, on a byte-level BPE tokenizer (SmolLM2's, whose tokens split
multi-byte characters) and on a Llama-style one (SentencePiece's "▁" for spaces, the leading one stripped
on decoding, and byte fallback), trained here on TinyStories."""

from __future__ import annotations

import random

import pytest
from helpers import TINYSTORIES_TEXT, require_data

from xpu_coopt.serve.text import StopText


def _streamed(tokenizer, tokens: list[int], stops: list[str]) -> tuple[str, bool, StopText]:
    text = StopText(tokenizer, stops)
    pieces = []
    for i, token in enumerate(tokens):
        piece, stopped = text.add(token, final=i == len(tokens) - 1)
        pieces.append(piece)
        if stopped:
            return "".join(pieces), True, text
    return "".join(pieces), False, text


def _tokens(tokenizer, seed: int) -> list[int]:
    rng = random.Random(seed)
    words = [
        "Once",
        "upon",
        "a",
        "time,",
        "héllo",
        "wörld",
        "—",
        "東京",
        "café",
        "naïve",
        "🙂",
        "the",
        "cat",
        "mat.",
    ]
    text = " ".join(rng.choice(words) for _ in range(40))
    tokens = tokenizer.encode(text, add_special_tokens=False)
    # random ids too: byte tokens that split characters and ids that decode to nothing alone
    return tokens + [rng.randrange(len(tokenizer)) for _ in range(20)] if seed % 2 else tokens


def _llama_style_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = require_data(TINYSTORIES_TEXT).read_text()[:200_000]
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", params=["byte-level", "llama-style"])
def tokenizer(request, smollm2_fp32):
    return smollm2_fp32[1] if request.param == "byte-level" else _llama_style_tokenizer()


@pytest.mark.parametrize("seed", range(6))
def test_streamed_pieces_join_into_the_whole_decode(tokenizer, seed):
    tokens = _tokens(tokenizer, seed)
    streamed, stopped, _ = _streamed(tokenizer, tokens, [])
    assert not stopped
    assert streamed == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("stops", [["the cat"], ["mat.", "東京"], ["a", "zzz"]])
def test_the_text_is_cut_at_the_earliest_stop_string(tokenizer, seed, stops):
    tokens = _tokens(tokenizer, seed)
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    found = [at for at in (whole.find(stop) for stop in stops) if at >= 0]
    streamed, stopped, text = _streamed(tokenizer, tokens, stops)
    assert stopped == bool(found)
    expected = whole[: min(found)] if found else whole
    assert streamed == expected == text.text


def test_nothing_that_could_start_a_stop_string_is_given_out_early(smollm2_fp32):
    tokenizer = smollm2_fp32[1]
    text = StopText(tokenizer, ["the end"])
    given = "".join(text.add(token, final=False)[0] for token in tokenizer.encode("and so it was the"))
    assert given == text.text[: text.sent] == "and so it w"  # "as the" could begin "the end"
