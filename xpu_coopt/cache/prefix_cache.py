"""K/V kept between generate() calls, so a prompt that starts where the last generation left off (the next
turn of a chat, another question over the same document) prefills only what is new.

transformers' idiom passes one cache object to successive generate() calls (`past_key_values=`); this is
xpu_coopt's object for it. It holds the tokens of one sequence and their K/V as the model's cache stored
them (an FP8 cache's codes and scales: half the bytes of 16-bit K/V); the next generate() reuses the
longest run of its prompt's first tokens that match, and prefills the rest over them (attention_prefill
with more key columns than queries). Unlike transformers' it checks the tokens: a prompt that departs
from them (a chat template that rewrites earlier turns, another document) reuses only what matches, never
K/V of other tokens.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from xpu_coopt.cache.held import HeldKV, request_kv


class PrefixCache:
    """Pass one to generate(..., past_key_values=cache) for each request of a conversation (one prompt per
    call, no padding). After each call it holds the prompt and, for one generated sequence (greedy or one
    sample), the reply's tokens but the last; with beams or several sequences, the prompt alone. One
    PrefixCache serves one model."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None  # int64 [N], the sequence whose K/V are held
        self.kv: HeldKV | None = None  # their K/V, [layers, N, kv_heads, head_dim], as the cache stored them
        self.reused_tokens = 0  # prompt tokens the last generate() took from here rather than prefilled
        self._model: weakref.ref | None = None

    def __repr__(self) -> str:
        held = 0 if self.tokens is None else self.tokens.numel()
        return f"PrefixCache({held} tokens, {self.nbytes()} bytes, last reuse {self.reused_tokens} tokens)"

    def __len__(self) -> int:
        return 0 if self.tokens is None else self.tokens.numel()

    def nbytes(self) -> int:
        """Bytes of K/V (and FP8 scales) held."""
        return 0 if self.kv is None else sum(t.numel() * t.element_size() for t in self.kv.tensors())

    def clear(self) -> None:
        """Forgets the tokens and frees their K/V."""
        self.tokens = self.kv = None

    def reusable(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
        """The prompt's first tokens whose K/V this holds: its longest common prefix with the held tokens,
        leaving at least one token to prefill (its logits choose the first new token). ValueError for a
        batch, a padded prompt or another model's cache."""
        self._claim(model)
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"past_key_values (a PrefixCache) takes one prompt per generate() call, got a batch of {input_ids.shape[0]}"
            )
        if attention_mask is not None and not bool(attention_mask.to(torch.bool).all()):
            raise ValueError("past_key_values (a PrefixCache) takes a prompt without padding")
        if self.tokens is None:
            return 0
        prompt = input_ids[0].to(self.tokens.device, torch.long)
        span = min(self.tokens.numel(), prompt.numel() - 1)
        differs = (prompt[:span] != self.tokens[:span]).nonzero()
        return span if differs.numel() == 0 else int(differs[0, 0])

    def _claim(self, model: Any) -> None:
        owner = None if self._model is None else self._model()
        if owner is not None and owner is not model:
            raise ValueError("this PrefixCache holds another model's K/V: use one PrefixCache per model")
        self._model = weakref.ref(model)

    def hold(self, cache: Any, sequence: torch.Tensor) -> None:
        """After a generation whose prompt reusable() took (one, unpadded): keep the K/V the generation's
        cache holds of `sequence` (its prompt, then the tokens generated; one row of generate()'s output),
        those of the prompt alone where the cache served several sequences. Where a sliding window has let
        go of the first tokens' K/V, nothing is kept (a warning says so) and the next generate() prefills
        its whole prompt."""
        count = cache.tokens_run()
        held = request_kv(cache, count)
        if held is None:
            self.clear()
            warnings.warn(
                "the conversation has outgrown the model's sliding window, which let go of its first tokens' "
                "K/V: the PrefixCache is emptied and the next generate() prefills its whole prompt",
                stacklevel=3,
            )
            return
        self.kv = held
        self.tokens = sequence[:count].to(torch.long).clone()
