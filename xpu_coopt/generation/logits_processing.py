"""The logits processors and stopping criteria of generate(), as transformers applies them: the same
arithmetic in the same order, vectorised over the rows, so that tokens and scores match its own (that of
the release installed, where releases differ)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from xpu_coopt.generation.settings import GenerationSettings
from xpu_coopt.generation.token_rules import (
    TokenRules,
    apply_after_min_lengths,
    apply_bad_words,
    apply_before_penalties,
)
from xpu_coopt.generation.transformers_release import MIN_P_FLOOR_BY_TOPK, PENALTY_SKIPS_PADDING

# --- logits processors, in transformers' order: sequence_bias, repetition_penalty, no_repeat_ngram_size,
# bad_words_ids, min_length and min_new_tokens, prefix_allowed_tokens_fn, forced BOS and EOS,
# remove_invalid_values, the exponential decay length penalty, suppress_tokens and begin_suppress_tokens,
# the caller's logits_processor; when sampling, then temperature, top_k, top_p, min_p, typical_p,
# epsilon_cutoff, eta_cutoff; last, renormalize_logits


def _penalize_repetitions(
    scores: torch.Tensor, tokens: torch.Tensor, prompt_start: torch.Tensor, settings: GenerationSettings
) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor. tokens [rows, length]: each row's prompt and what it
    generated so far; prompt_start [rows]: its first prompt column after the left padding. Every token id
    a row holds (past its padding, from transformers 5.23) has its score divided by the penalty where
    positive and multiplied by it where negative, once however often it occurs."""
    if settings.repetition_penalty == 1.0:
        return scores
    vocab = scores.shape[-1]
    # Ids the LM head cannot produce, and padding where skipped, go to one extra column dropped after.
    tokens = tokens.clamp(max=vocab)
    if PENALTY_SKIPS_PADDING:
        columns = torch.arange(tokens.shape[1], device=tokens.device)
        tokens = tokens.masked_fill(columns < prompt_start[:, None], vocab)
    padded = F.pad(scores, (0, 1))
    seen = padded.gather(1, tokens)
    seen = torch.where(seen < 0, seen * settings.repetition_penalty, seen / settings.repetition_penalty)
    return padded.scatter(1, tokens, seen)[:, :vocab]


def _ban_repeated_ngrams(
    scores: torch.Tensor, tokens: torch.Tensor, settings: GenerationSettings
) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor, vectorised. tokens [rows, length]: each row's whole
    history, left padding included (as transformers counts it). A token that would complete an n-gram the
    row already holds gets -inf: every earlier n-gram whose first n - 1 tokens equal the row's last n - 1
    bans its last token."""
    n = settings.no_repeat_ngram_size
    if n == 0 or tokens.shape[1] < n:
        return scores
    vocab = scores.shape[-1]
    ngrams = tokens.unfold(1, n, 1)  # [rows, length - n + 1, n]
    repeats = (ngrams[:, :, : n - 1] == tokens[:, None, tokens.shape[1] - n + 1 :]).all(dim=-1)
    # Ids that complete no repeat, and ids the LM head cannot produce, go to one extra column, dropped after.
    banned = ngrams[:, :, n - 1].clamp(max=vocab).masked_fill(~repeats, vocab)
    return F.pad(scores, (0, 1)).scatter(1, banned, float("-inf"))[:, :vocab]


def _suppress_eos(
    scores: torch.Tensor, settings: GenerationSettings, eos: torch.Tensor, length: int, new_tokens: int
) -> torch.Tensor:
    """transformers' MinLength and MinNewTokensLength processors: no EOS while the rows are shorter than
    min_length (length: their columns, padding included) or hold fewer than min_new_tokens generated ones.
    eos: the EOS ids on the scores' device (indexing with a Python list would copy it there, a wait)."""
    if eos.numel() and (length < settings.min_length or new_tokens < settings.min_new_tokens):
        scores = scores.index_fill(-1, eos, float("-inf"))
    return scores


def _run_callers_processors(
    scores: torch.Tensor, tokens: torch.Tensor, settings: GenerationSettings
) -> torch.Tensor:
    """The caller's logits_processor, each given the rows' tokens so far (prompt and padding included) and
    the scores as processed up to it, as transformers calls them."""
    for processor in settings.logits_processor:
        processed = processor(tokens, scores)
        if not isinstance(processed, torch.Tensor) or processed.shape != scores.shape:
            got = (
                type(processed).__name__
                if not isinstance(processed, torch.Tensor)
                else tuple(processed.shape)
            )
            raise ValueError(
                f"logits_processor {processor!r} returned {got}: a processor returns the scores, a tensor "
                f"of shape {tuple(scores.shape)}"
            )
        scores = processed
    return scores


def stopping_criteria(settings: GenerationSettings) -> list[Any]:
    """transformers' criteria for max_time and stop_strings (made per generation: max_time's clock starts
    here), then the caller's, in transformers' order; EOS and the length limit are the loops' own."""
    criteria: list[Any] = []
    if settings.max_time is not None or settings.stop_strings is not None:
        from transformers import MaxTimeCriteria, StopStringCriteria

        if settings.max_time is not None:
            criteria.append(MaxTimeCriteria(max_time=settings.max_time))
        if settings.stop_strings is not None:
            criteria.append(
                StopStringCriteria(tokenizer=settings.tokenizer, stop_strings=settings.stop_strings)
            )
    return criteria + list(settings.stopping_criteria)


def criteria_met(
    criteria: list[Any], tokens: torch.Tensor, scores: list[torch.Tensor] | None
) -> torch.Tensor:
    """bool [rows]: rows some criterion ends (tokens: each row's whole sequence, its newest token included;
    scores: the processed scores so far, as transformers passes them with output_scores, else None)."""
    met = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    scores_so_far = None if scores is None else tuple(scores)
    for criterion in criteria:
        met |= _rows_done(criterion, criterion(tokens, scores_so_far), met)
    return met


def _rows_done(criterion: Any, result: Any, met: torch.Tensor) -> torch.Tensor:
    """A criterion's result as bool [rows]: a tensor of one flag per row, or one flag for every row (a
    Python bool or a one-element tensor, as transformers' StoppingCriteriaList takes it)."""
    if isinstance(result, bool):
        return torch.full_like(met, result)
    if isinstance(result, torch.Tensor) and result.numel() in (1, met.numel()):
        return result.to(device=met.device, dtype=torch.bool).reshape(-1).expand_as(met)
    raise ValueError(
        f"stopping criterion {criterion!r} returned {result!r}: a criterion returns a bool, or a bool "
        f"tensor of one flag per row ({met.numel()})"
    )


def process(
    scores: torch.Tensor,
    tokens: torch.Tensor,
    prompt_start: torch.Tensor,
    eos: torch.Tensor,
    step: int,
    settings: GenerationSettings,
    rules: TokenRules,
) -> torch.Tensor:
    """The processors before the sampling warpers, in transformers' order, on float32 scores; tokens: each
    row's sequence so far, step: tokens generated so far; rules: the token-id arguments' tensors."""
    scores = apply_before_penalties(scores, tokens, rules)
    scores = _penalize_repetitions(scores, tokens, prompt_start, settings)
    scores = _ban_repeated_ngrams(scores, tokens, settings)
    scores = apply_bad_words(scores, tokens, rules)
    scores = _suppress_eos(scores, settings, eos, tokens.shape[1], step)
    scores = apply_after_min_lengths(scores, tokens, rules, settings, step)
    return _run_callers_processors(scores, tokens, settings)


def renormalize(scores: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """renormalize_logits: log-softmax of the scores every processor and warper has been through, as
    transformers' LogitNormalization, always the last."""
    return scores.log_softmax(dim=-1) if settings.renormalize_logits else scores


def warp(scores: torch.Tensor, settings: GenerationSettings, keep: int = 1) -> torch.Tensor:
    """transformers' sampling warpers, in its order. keep: the most likely tokens each warper leaves (beam
    sampling keeps one more than the EOS ids, so that a beam can always go on without ending)."""
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    if settings.top_k:
        k = min(max(settings.top_k, keep), scores.shape[-1])
        scores = scores.masked_fill(scores < _kth_largest(scores, k), float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - settings.top_p)
        remove[..., -keep:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))
    if settings.min_p is not None:
        probs = scores.softmax(dim=-1)
        remove = probs < settings.min_p * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(_floor_kept(remove, probs, scores, keep), float("-inf"))
    if settings.typical_p < 1.0:
        scores = _typical(scores, settings.typical_p, keep)
    if settings.epsilon_cutoff > 0:
        scores = _below_cutoff_removed(scores, settings.epsilon_cutoff, keep)
    if settings.eta_cutoff > 0:
        # eta sampling: the cutoff falls with the distribution's entropy, to at most eta_cutoff
        eta = torch.tensor(settings.eta_cutoff)
        entropy = torch.distributions.Categorical(logits=scores).entropy()
        cutoff = torch.min(eta, eta.sqrt() * torch.exp(-entropy))[..., None]
        scores = _below_cutoff_removed(scores, cutoff, keep)
    return scores


def _floor_kept(remove: torch.Tensor, probs: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """min_p's removal mask with the `keep` most likely tokens kept, as the installed transformers picks
    them among ties (transformers_release.MIN_P_FLOOR_BY_TOPK)."""
    if MIN_P_FLOOR_BY_TOPK:
        kept = torch.topk(probs, min(keep, probs.shape[-1]), dim=-1).indices
        return remove.scatter(-1, kept, False)
    order = torch.argsort(scores, descending=True, dim=-1)
    remove_sorted = remove.gather(-1, order)
    remove_sorted[..., :keep] = False
    return remove_sorted.scatter(1, order, remove_sorted)


def _kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, 1]: each row's k-th largest score (k clipped to the vocabulary)."""
    return torch.topk(scores, min(k, scores.shape[-1]))[0][..., -1, None]


def _typical(scores: torch.Tensor, mass: float, keep: int) -> torch.Tensor:
    """transformers' TypicalLogitsWarper: keeps the tokens whose surprisal is closest to the entropy, up to
    `mass` of probability (and the first token past it)."""
    log_probs = scores.log_softmax(dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
    distance, order = torch.sort((-log_probs - entropy).abs(), descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp(max=distance.shape[-1] - 1)
    remove = distance > distance.gather(1, last.view(-1, 1))
    remove[..., :keep] = False  # the most typical tokens always stay
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def _below_cutoff_removed(scores: torch.Tensor, cutoff: float | torch.Tensor, keep: int) -> torch.Tensor:
    """Removes the tokens less probable than `cutoff`, the `keep` most likely excepted (epsilon and eta
    sampling, as transformers' warpers)."""
    remove = (scores.softmax(dim=-1) < cutoff) & (scores < _kth_largest(scores, keep))
    return scores.masked_fill(remove, float("-inf"))


@dataclass(frozen=True)
class LogitsProcessing:
    """One generation's processors, sampling warpers and renormalization, run in transformers' order."""

    settings: GenerationSettings
    rules: TokenRules  # the token-id arguments' tensors
    eos: torch.Tensor  # the EOS ids, on the device
    prompt_start: torch.Tensor  # each row's first column after its left padding

    def scores(self, scores: torch.Tensor, tokens: torch.Tensor, step: int, keep: int = 1) -> torch.Tensor:
        """float32 scores [rows, vocab] processed, warped when sampling (each warper keeping at least `keep`
        tokens) and renormalized where asked; tokens: each row's sequence so far; step: tokens generated."""
        scores = process(scores, tokens, self.prompt_start, self.eos, step, self.settings, self.rules)
        if self.settings.do_sample:
            scores = warp(scores, self.settings, keep)
        return renormalize(scores, self.settings)
