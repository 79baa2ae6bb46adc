"""Text in and text out for `xpu-coopt generate`: prompts to a left-padded batch of token ids, generated ids
back to text (streamed as they come), for either tokenizer a model loads with (transformers' or the
llama2.c one)."""

from __future__ import annotations

from typing import Any, TextIO

import torch

from xpu_coopt.checkpoints import Llama2cTokenizer

# Tokens before the new ones that a streamed piece is decoded after: enough for a sentencepiece tokenizer
# to keep a word's leading space (which it drops at the start of a decode); more only costs time.
STREAM_CONTEXT_TOKENS = 8
# New tokens a stream decodes together before it moves its context on, so a step decodes a bounded number.
STREAM_FLUSH_TOKENS = 16


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a chat needs a tokenizer with a chat template; this model's has none")


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation's ids through the tokenizer's chat template (its messages: role and content),
    followed by the opening of the assistant's turn."""
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """The prompt's ids as the model reads it, its tokenizer's special tokens (BOS) included; with chat, as
    a user turn of the tokenizer's chat template followed by the opening of the assistant's turn."""
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    if isinstance(tokenizer, Llama2cTokenizer):
        return tokenizer.encode(prompt, bos=True)
    return tokenizer(prompt)["input_ids"]


def encode_prompts(
    tokenizer: Any, prompts: list[str], chat: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), int64 [prompts, longest], left-padded with the tokenizer's pad id."""
    rows = [prompt_ids(tokenizer, prompt, chat) for prompt in prompts]
    for number, ids in enumerate(rows, 1):
        if not ids:
            raise ValueError(f"prompt {number} is empty: it has no tokens")
    # The padding's id is never read (the mask hides it): the tokenizer's pad id, else EOS, else 0.
    pad_id = next(
        (i for i in (getattr(tokenizer, "pad_token_id", None), tokenizer.eos_token_id) if i is not None), 0
    )
    longest = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids) :] = 1
    return input_ids, attention_mask


def decode(tokenizer: Any, ids: list[int]) -> str:
    """The text of ids, special tokens left out."""
    if isinstance(tokenizer, Llama2cTokenizer):
        return tokenizer.decode(ids)  # leaves BOS and EOS out
    return tokenizer.decode(ids, skip_special_tokens=True)


def completion_text(tokenizer: Any, context_ids: list[int], new_ids: list[int]) -> str:
    """The text new_ids add after context_ids. They are decoded together, since a sentencepiece tokenizer
    drops the leading space of the first token it decodes; where the context's text is not a prefix of the
    whole (a tokenizer that rewrites across the boundary), the new ids alone."""
    context = decode(tokenizer, context_ids)
    whole = decode(tokenizer, context_ids + new_ids)
    return whole[len(context) :] if whole.startswith(context) else decode(tokenizer, new_ids)


class TextStream:
    """generate()'s streamer (transformers' put/end interface) for one sequence: writes the text of its new
    tokens as they come, holding back a character whose UTF-8 bytes are still arriving."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.context: list[int] | None = None  # None until put() has given the prompt
        self.pending: list[int] = []  # new ids whose text is not all written yet
        self.written = 0  # characters of the pending ids' text already written

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.context is None:  # the first call carries the prompt, as transformers' streamers receive
            self.context = ids[-STREAM_CONTEXT_TOKENS:]
            return
        self.pending += ids
        text = completion_text(self.tokenizer, self.context, self.pending)
        if text.endswith("\ufffd"):  # a byte-fallback character cut short: wait for its other bytes
            return
        self._write(text)
        if len(self.pending) >= STREAM_FLUSH_TOKENS:
            self.context = (self.context + self.pending)[-STREAM_CONTEXT_TOKENS:]
            self.pending, self.written = [], 0

    def end(self) -> None:
        if self.pending:
            self._write(completion_text(self.tokenizer, self.context or [], self.pending))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        self.out.write(text[self.written :])
        self.out.flush()
        self.written = len(text)
