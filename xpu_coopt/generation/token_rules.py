"""generate()'s arguments that name token ids (sequence_bias, bad_words_ids, prefix_allowed_tokens_fn,
suppress_tokens, begin_suppress_tokens, forced_bos_token_id, forced_eos_token_id,
exponential_decay_length_penalty): their ids checked against the vocabulary and made device tensors once
per generation, before the prompt is run, and applied as transformers' processors apply them, with the
same arithmetic so that scores match."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xpu_coopt.generation.settings import GenerationSettings
from xpu_coopt.generation.transformers_release import PREFIX_BATCH_SPANS_RETURN_SEQUENCES


@dataclass(frozen=True)
class SequenceBias:
    """transformers' SequenceBiasLogitsProcessor (and NoBadWordsLogitsProcessor: a bias of -inf): a token
    sequence's bias is added to its last token's score in the rows whose last tokens are the rest of it."""

    single: torch.Tensor  # float32 [vocab]: the biases of one-token sequences
    # one (prefixes [n, length], last tokens [n], biases [n]) per prefix length of the longer sequences
    longer: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]

    @classmethod
    def of(cls, biases: dict[tuple[int, ...], float], vocab: int, device: torch.device) -> SequenceBias:
        single = torch.zeros(vocab, dtype=torch.float32, device=device)
        ones = [(ids[0], bias) for ids, bias in biases.items() if len(ids) == 1]
        if ones:
            single[[token for token, _ in ones]] = torch.tensor([bias for _, bias in ones], device=device)
        by_prefix_length: dict[int, list[tuple[tuple[int, ...], float]]] = {}
        for ids, bias in biases.items():
            if len(ids) > 1:
                by_prefix_length.setdefault(len(ids) - 1, []).append((ids, bias))
        longer = tuple(
            (
                torch.tensor([ids[:-1] for ids, _ in group], device=device),
                torch.tensor([ids[-1] for ids, _ in group], device=device),
                torch.tensor([bias for _, bias in group], dtype=torch.float32, device=device),
            )
            for group in by_prefix_length.values()
        )
        return cls(single, longer)

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # The biases are summed first, then added, as transformers does: the same rounding.
        bias = torch.zeros_like(scores)
        bias += self.single
        for prefixes, last_tokens, biases in self.longer:
            length = prefixes.shape[1]
            if length > tokens.shape[1]:  # longer than the rows so far: matches nothing yet
                continue
            matching = (tokens[:, None, -length:] == prefixes).all(dim=-1)
            bias.index_add_(1, last_tokens, torch.where(matching, biases, 0.0))
        return scores + bias


@dataclass(frozen=True)
class TokenRules:
    """The token-id arguments of one generation, as device tensors (None: not asked for)."""

    sequence_bias: SequenceBias | None
    bad_words: SequenceBias | None
    forced_bos: torch.Tensor | None
    forced_eos: torch.Tensor | None
    decay_eos: torch.Tensor | None  # exponential_decay_length_penalty's EOS ids
    suppress: torch.Tensor | None
    begin_suppress: torch.Tensor | None

    @classmethod
    def of(cls, settings: GenerationSettings, vocab: int, device: torch.device) -> TokenRules:
        """ValueError, naming the argument, for an id outside the vocabulary."""

        def check(name: str, values: list[int]) -> None:
            outside = sorted({token for token in values if token >= vocab})
            if outside:
                raise ValueError(f"{name} names token ids {outside} outside the vocabulary of {vocab} tokens")

        def ids(name: str, values: list[int] | None) -> torch.Tensor | None:
            if values is None:
                return None
            check(name, values)
            return torch.tensor(values, dtype=torch.long, device=device)

        def bias(name: str, biases: dict[tuple[int, ...], float] | None) -> SequenceBias | None:
            if not biases:
                return None
            check(name, [token for sequence in biases for token in sequence])
            return SequenceBias.of(biases, vocab, device)

        bad_words = None
        if settings.bad_words_ids is not None:
            # As transformers: a bad word that is one EOS id alone is not banned (EOS must stay possible).
            eos = [[token] for token in settings.eos_token_id or []]
            bad_words = {tuple(words): -math.inf for words in settings.bad_words_ids if words not in eos}
        forced_bos = None if settings.forced_bos_token_id is None else [settings.forced_bos_token_id]
        decay = settings.exponential_decay_length_penalty
        return cls(
            sequence_bias=bias("sequence_bias", settings.sequence_bias),
            bad_words=bias("bad_words_ids", bad_words),
            forced_bos=ids("forced_bos_token_id", forced_bos),
            forced_eos=ids("forced_eos_token_id", settings.forced_eos_token_id),
            decay_eos=None if decay is None else ids("eos_token_id", settings.eos_token_id),
            suppress=ids("suppress_tokens", settings.suppress_tokens),
            begin_suppress=ids("begin_suppress_tokens", settings.begin_suppress_tokens),
        )


def _forced(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Scores that leave only `tokens` possible (score 0, every other -inf), as transformers forces them."""
    forced = torch.full_like(scores, -math.inf)
    forced[:, tokens] = 0
    return forced


def _suppressed(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return scores.index_fill(-1, tokens, -math.inf)


def _only_allowed(scores: torch.Tensor, tokens: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """transformers' PrefixConstrainedLogitsProcessor: each row may take only the tokens that
    prefix_allowed_tokens_fn(its prompt's index in the batch, its tokens so far) allows. The index is the
    row over num_beams, or from transformers 5.24 over max(num_beams, num_return_sequences) (before it, each
    sample of num_return_sequences counts as a prompt of its own)."""
    rows_per_index = settings.num_beams
    if PREFIX_BATCH_SPANS_RETURN_SEQUENCES:
        rows_per_index = max(settings.num_beams, settings.num_return_sequences)
    allowed = torch.full_like(scores, -math.inf)
    for row in range(tokens.shape[0]):
        prompt = row // rows_per_index
        tokens_allowed = settings.prefix_allowed_tokens_fn(prompt, tokens[row])
        if len(tokens_allowed) == 0:
            raise ValueError(
                f"prefix_allowed_tokens_fn allowed no token for batch index {prompt}: the constraint cannot be "
                "satisfied"
            )
        allowed[row, tokens_allowed] = 0
    return scores + allowed


def apply_before_penalties(scores: torch.Tensor, tokens: torch.Tensor, rules: TokenRules) -> torch.Tensor:
    """sequence_bias: transformers' first processor."""
    return scores if rules.sequence_bias is None else rules.sequence_bias(scores, tokens)


def apply_bad_words(scores: torch.Tensor, tokens: torch.Tensor, rules: TokenRules) -> torch.Tensor:
    """bad_words_ids: after no_repeat_ngram_size, before min_length."""
    return scores if rules.bad_words is None else rules.bad_words(scores, tokens)


def apply_after_min_lengths(
    scores: torch.Tensor, tokens: torch.Tensor, rules: TokenRules, settings: GenerationSettings, step: int
) -> torch.Tensor:
    """The processors transformers runs after min_new_tokens and before the caller's, in its order:
    prefix_allowed_tokens_fn, forced BOS, forced EOS, remove_invalid_values, the exponential decay length
    penalty, suppress_tokens, begin_suppress_tokens. tokens: each row's sequence so far, its prompt's
    columns (padding included) then `step` generated tokens."""
    prompt_len = tokens.shape[1] - step
    length = tokens.shape[1]
    if settings.prefix_allowed_tokens_fn is not None:
        scores = _only_allowed(scores, tokens, settings)
    if rules.forced_bos is not None and length == 1:  # only ever a one-token prompt's first step
        scores = _forced(scores, rules.forced_bos)
    if rules.forced_eos is not None and step == settings.max_new_tokens - 1:
        scores = _forced(scores, rules.forced_eos)
    if settings.remove_invalid_values:
        finfo = torch.finfo(scores.dtype)
        scores = torch.nan_to_num(scores, nan=0.0, posinf=finfo.max, neginf=finfo.min)
    if rules.decay_eos is not None:
        start, factor = settings.exponential_decay_length_penalty
        if step > start:
            # transformers' ExponentialDecayLengthPenalty: EOS scores grow by |score| (factor^k - 1), k
            # tokens past the start (the float power in Python, as there)
            eos_scores = scores[:, rules.decay_eos]
            penalty = torch.abs(eos_scores) * (pow(factor, step - start) - 1)
            penalties = torch.zeros_like(scores)
            penalties[:, rules.decay_eos] = penalty.masked_fill(~torch.isfinite(eos_scores), 0.0)
            scores = scores + penalties
    if rules.suppress is not None:
        scores = _suppressed(scores, rules.suppress)
    if rules.begin_suppress is not None:
        # The first generated token, or the second after a forced BOS on a one-token prompt (transformers'
        # begin_index).
        begin = prompt_len + (1 if prompt_len == 1 and rules.forced_bos is not None else 0)
        if length == begin:
            scores = _suppressed(scores, rules.begin_suppress)
    return scores
