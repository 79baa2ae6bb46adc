"""Prompts to token batches and generated ids back to text (xpu_coopt.cli.prompts), for `xpu-coopt generate`."""

from __future__ import annotations

import pytest
import torch

from xpu_coopt.cli.prompts import STREAM_FLUSH_TOKENS, TextStream, completion_text, encode_prompts

TEXT_OUTSIDE_THE_VOCABULARY = "Ein Bär sah 🐻 — und lief."  # byte-fallback pieces, 2 to 4 bytes a character


class Writes:
    """A text stream that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def test_llama2c_decode_gathers_byte_pieces_into_characters(stories_tokenizer):
    ids = stories_tokenizer.encode(TEXT_OUTSIDE_THE_VOCABULARY, bos=True)
    assert stories_tokenizer.decode(ids) == TEXT_OUTSIDE_THE_VOCABULARY
    cut = ids.index(stories_tokenizer.ids["<0xC3>"])  # the first of the two bytes of "ä"
    assert stories_tokenizer.decode(ids[: cut + 1]).endswith("B\ufffd")


@pytest.mark.parametrize("prompt", ["Once upon a time", "Mia said:"])
def test_stream_writes_each_character_once_and_whole(stories_tokenizer, prompt):
    """Token by token, with characters cut across byte pieces and more tokens than a flush: the writes add
    up to the text the new tokens add after the prompt, and none holds half a character."""
    prompt_ids = stories_tokenizer.encode(prompt, bos=True)
    new_ids = stories_tokenizer.encode(" " + TEXT_OUTSIDE_THE_VOCABULARY * 2, bos=False)[1:]
    assert len(new_ids) > 2 * STREAM_FLUSH_TOKENS
    out = Writes()
    stream = TextStream(stories_tokenizer, out)
    stream.put(torch.tensor([prompt_ids]))
    for token in new_ids:
        stream.put(torch.tensor([token]))
    stream.end()
    assert not any("\ufffd" in text for text in out.writes)
    assert "".join(out.writes) == completion_text(stories_tokenizer, prompt_ids, new_ids) + "\n"
    whole = stories_tokenizer.decode(prompt_ids + new_ids)
    assert prompt + "".join(out.writes) == whole + "\n"


def test_encode_prompts_pads_on_the_left(stories_tokenizer):
    prompts = ["Once upon a time there was a dog", "Hi"]
    input_ids, attention_mask = encode_prompts(stories_tokenizer, prompts)
    rows = [stories_tokenizer.encode(prompt, bos=True) for prompt in prompts]
    assert input_ids.shape == attention_mask.shape == (2, len(rows[0]))
    for row, ids in enumerate(rows):
        assert input_ids[row][attention_mask[row].bool()].tolist() == ids
        assert attention_mask[row].tolist() == [0] * (len(rows[0]) - len(ids)) + [1] * len(ids)


def test_encode_prompts_with_a_chat_template(smollm2_fp32):
    tokenizer = smollm2_fp32[1]
    input_ids, _ = encode_prompts(tokenizer, ["Hi"], chat=True)
    text = tokenizer.decode(input_ids[0])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


class WordTokenizer:
    """transformers' tokenizer call for a tokenizer that adds no BOS: one id per word."""

    pad_token_id = None
    eos_token_id = 7

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [len(word) for word in text.split()]}


def test_padding_takes_the_pad_id_else_eos_else_zero():
    input_ids, _ = encode_prompts(WordTokenizer(), ["a bb", "ccc"])
    assert input_ids.tolist() == [[1, 2], [7, 3]]  # EOS where there is no pad id
    without_special_ids = WordTokenizer()
    without_special_ids.eos_token_id = None
    assert encode_prompts(without_special_ids, ["a bb", "ccc"])[0].tolist() == [[1, 2], [0, 3]]


def test_an_empty_prompt_is_an_error_where_the_tokenizer_adds_no_bos():
    with pytest.raises(ValueError, match="prompt 2 is empty: it has no tokens"):
        encode_prompts(WordTokenizer(), ["Hi", ""])
