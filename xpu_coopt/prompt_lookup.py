"""Prompt lookup decoding's drafts: the tokens that followed an earlier occurrence of the sequence's last
n-gram, as transformers' PromptLookupCandidateGenerator finds them.

Generation from a text the prompt holds (a summary, an edit, an answer quoting its document) often repeats
runs of the prompt. Greedy decoding with `prompt_lookup_num_tokens` guesses the next tokens as those that
followed the last tokens' earlier occurrence, runs them through the model in one step and keeps those that
greedy decoding would have chosen, plus the model's own next token: the same tokens as plain greedy
decoding, in fewer steps, each of which reads the weights once for several tokens.
"""

from __future__ import annotations

import torch


def find_drafts(
    sequence: torch.Tensor, max_drafts: int, max_ngram_size: int, eos_token_ids: torch.Tensor
) -> torch.Tensor:
    """The draft tokens for the token after `sequence` (int64 [length], on the host): for n from
    max_ngram_size down to 1, the first earlier occurrence of the last n tokens that has tokens after it
    gives up to max_drafts of them, cut before the first EOS id. Empty where nothing matches."""
    length = sequence.shape[0]
    for ngram_size in range(min(max_ngram_size, length - 1), 0, -1):
        windows = sequence.unfold(0, ngram_size, 1)  # [length - ngram_size + 1, ngram_size]
        starts = (windows == sequence[-ngram_size:]).all(dim=1).nonzero()[:, 0] + ngram_size
        starts = starts[starts < length]  # the last n-gram itself has nothing after it
        if starts.numel():
            start = int(starts[0])
            drafts = sequence[start : min(start + max_drafts, length)]
            ends = torch.isin(drafts, eos_token_ids).nonzero()
            return drafts[: int(ends[0, 0])] if ends.numel() else drafts
    return sequence[:0]
