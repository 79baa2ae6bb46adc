"""A step's next tokens, row by row with each request's own settings: penalties first (transformers'
repetition penalty over the prompt and output, OpenAI's presence and frequency penalties over the
output), then greedy (argmax, as generate's) or sampled with temperature, top_k, top_p and min_p from
the request's own generator, so a seeded request's tokens do not depend on the batch it runs in; and,
where a request asks, each token's log-probability and the likeliest alternatives'."""

from __future__ import annotations

import torch

from xpu_coopt.engine.request import Sequence, TokenLogprobs


def next_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """logits [S, vocab] (one row a sequence) -> each sequence's next token."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, sequence in enumerate(sequences):
        if not sequence.penalized and sequence.params.temperature == 0:
            tokens.append(greedy[row])
            continue
        scores = logits[row].to(torch.float32, copy=True)  # a copy: penalties change it in place
        scores = _penalized(scores, sequence) if sequence.penalized else scores
        sampled = sequence.params.temperature > 0
        tokens.append(_sample(scores, sequence) if sampled else int(scores.argmax()))
    return tokens


def _penalized(scores: torch.Tensor, sequence: Sequence) -> torch.Tensor:
    params = sequence.params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(sequence.token_ids)), device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(
            picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty
        )
    if sequence.output_ids and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(sequence.output_ids, device=scores.device).unique(return_counts=True)
        scores[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    return scores


def _sample(scores: torch.Tensor, sequence: Sequence) -> int:
    params = sequence.params
    scores = scores / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1:
        ordered, order = probs.sort(descending=True)
        # keep the smallest head whose mass reaches top_p (the first token always)
        outside = ordered.cumsum(-1) - ordered >= params.top_p
        probs = probs.index_put((order[outside],), torch.zeros(()))
    return int(torch.multinomial(probs, 1, generator=sequence.generator).item())


def token_logprobs(
    logits: torch.Tensor, sequences: list[Sequence], tokens: list[int]
) -> list[TokenLogprobs | None]:
    """Each chosen token's log-probability under the model's logits (and the params.logprobs likeliest),
    for the sequences that ask; None for the others."""
    out: list[TokenLogprobs | None] = [None] * len(sequences)
    asking = [row for row, sequence in enumerate(sequences) if sequence.params.logprobs is not None]
    if not asking:
        return out
    logprobs = torch.log_softmax(logits[asking].to(torch.float32), dim=-1)
    chosen = logprobs.gather(1, torch.tensor([[tokens[row]] for row in asking], device=logits.device))
    most = max(sequences[row].params.logprobs for row in asking)
    top_values, top_ids = logprobs.topk(most, dim=-1)
    chosen, top_values, top_ids = chosen[:, 0].tolist(), top_values.tolist(), top_ids.tolist()
    for i, row in enumerate(asking):
        count = sequences[row].params.logprobs
        out[row] = TokenLogprobs(
            chosen[i], tuple(zip(top_ids[i][:count], top_values[i][:count], strict=True))
        )
    return out
