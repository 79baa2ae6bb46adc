"""Prompt lookup decoding's drafts: the tokens that followed an earlier occurrence of the sequence's last
n-gram, as transformers' PromptLookupCandidateGenerator finds them.

Generation from a text the prompt holds (a summary, an edit, an answer quoting its document) often repeats
runs of the prompt. With `prompt_lookup_num_tokens`, generate() guesses the next tokens as those that
followed the last tokens' earlier occurrence, runs them through the model in one step, chooses a token
after each as it would without them, and keeps the guesses it chose, plus its own next token: greedy, the
same tokens as plain greedy decoding, in fewer steps, each of which reads the weights once for several
tokens (xpu_coopt/generation/ runs the steps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# forbidden(tokens, token): whether the logits processors leave `token` no chance after `tokens`
Forbidden = Callable[[torch.Tensor, int], bool]


def find_drafts(
    sequence: torch.Tensor,
    max_drafts: int,
    max_ngram_size: int,
    eos_token_ids: torch.Tensor,
    forbidden: Forbidden | None = None,
) -> torch.Tensor:
    """The draft tokens for the token after `sequence` (int64 [length], on the host): for n from
    max_ngram_size down to 1, the first earlier occurrence of the last n tokens that has tokens after it
    gives up to max_drafts of them, cut before the first one `forbidden` rules out (an occurrence whose
    drafts that leaves none gives way to the next) and before the first EOS id. Empty where nothing
    matches."""
    length = sequence.shape[0]
    for ngram_size in range(min(max_ngram_size, length - 1), 0, -1):
        windows = sequence.unfold(0, ngram_size, 1)  # [length - ngram_size + 1, ngram_size]
        starts = (windows == sequence[-ngram_size:]).all(dim=1).nonzero()[:, 0] + ngram_size
        for start in starts[starts < length].tolist():  # the last n-gram itself has nothing after it
            drafts = sequence[start : min(start + max_drafts, length)]
            if forbidden is not None:
                drafts = _allowed_prefix(sequence, drafts, forbidden)
            if drafts.numel() or forbidden is None:
                ends = torch.isin(drafts, eos_token_ids).nonzero()
                return drafts[: int(ends[0, 0])] if ends.numel() else drafts
    return sequence[:0]


def _allowed_prefix(sequence: torch.Tensor, drafts: torch.Tensor, forbidden: Forbidden) -> torch.Tensor:
    """The drafts up to the first that `forbidden` rules out after the sequence and the drafts before it."""
    for index, token in enumerate(drafts.tolist()):
        if forbidden(torch.cat((sequence, drafts[:index])), token):
            return drafts[:index]
    return drafts
