"""A step's next tokens, row by row with each request's own settings: greedy (argmax, as generate's) or
sampled with temperature, top_k and top_p from the request's own generator, so a seeded request's
tokens do not depend on the batch it runs in."""

from __future__ import annotations

import torch

from xpu_coopt.engine.request import Sequence


def next_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """logits [S, vocab] (one row a sequence) -> each sequence's next token."""
    greedy = logits.argmax(dim=-1).tolist()
    return [
        greedy[row] if seq.params.temperature == 0 else _sample(logits[row], seq)
        for row, seq in enumerate(sequences)
    ]


def _sample(logits: torch.Tensor, sequence: Sequence) -> int:
    params = sequence.params
    scores = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1:
        ordered, order = probs.sort(descending=True)
        # keep the smallest head whose mass reaches top_p (the first token always)
        outside = ordered.cumsum(-1) - ordered >= params.top_p
        probs = probs.index_put((order[outside],), torch.zeros(()))
    return int(torch.multinomial(probs, 1, generator=sequence.generator).item())
