"""Prompt lookup decoding's drafts: the tokens that followed an earlier occurrence of the sequence's last
n-gram, as transformers' PromptLookupCandidateGenerator finds them.

Generation from a text the prompt holds (a summary, an edit, an answer quoting its document) often repeats
runs of the prompt. With `prompt_lookup_num_tokens`, generate() guesses the next tokens as those that
followed the last tokens' earlier occurrence, runs them through the model in one step, chooses a token
after each as it would without them, and keeps the guesses it chose, plus its own next token: greedy, the
same tokens as plain greedy decoding, in fewer steps, each of which reads the weights once for several
tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from xpu_coopt.generation.logits_processing import LogitsProcessing, criteria_met, stopping_criteria
from xpu_coopt.generation.output import GenerateOutput, StepRecord, eos_ids
from xpu_coopt.generation.request import GenerationRequest
from xpu_coopt.generation.settings import GenerationSettings
from xpu_coopt.generation.token_rules import TokenRules

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


class PromptLookup:
    """One prompt lookup generation's drafts and scores: the sequence on the host (where drafts are looked
    up) and on the device (what the processors see), and the settings' processors."""

    def __init__(self, input_ids: torch.Tensor, settings: GenerationSettings, rules: TokenRules,
                 prompt_start: torch.Tensor, eos: torch.Tensor, vocab: int) -> None:  # fmt: skip
        self.settings, self.vocab = settings, vocab
        self.processing = LogitsProcessing(settings, rules, eos, prompt_start)
        self.prompt_len = input_ids.shape[1]
        # Room for the drafts of a step that runs past max_new_tokens (transformers' rule, lookup()).
        room = self.prompt_len + settings.max_new_tokens + settings.prompt_lookup_num_tokens
        self.sequences = torch.empty((1, room), dtype=torch.long, device=input_ids.device)
        self.sequences[:, : self.prompt_len] = input_ids
        self.history = self.sequences[0].cpu()
        self.host_eos = eos.cpu()
        self.eos_set = set(settings.eos_token_id or [])

    def scores(self, row_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The scores a token is chosen from after `tokens` [1, length]: processed (and warped when
        sampling) as without drafts."""
        return self.processing.scores(row_logits, tokens, tokens.shape[1] - self.prompt_len)

    def forbidden(self, tokens: torch.Tensor, token: int) -> bool:
        """transformers' check of a draft: the processors leave it no chance on uniform logits."""
        device = self.sequences.device
        uniform = torch.ones((1, self.vocab), dtype=torch.float32, device=device)
        score = float(self.scores(uniform, tokens.to(device).view(1, -1))[0, token])
        return score in (float("-inf"), torch.finfo(torch.float32).min)

    def drafts(self, generated: int, run_limit: float) -> torch.Tensor:
        """The drafts after the sequence so far. As transformers: drafts past max_new_tokens run too (their
        tokens are dropped), so that a sampled step draws as many rows as its; none for the last token;
        and a run (the token before them, then they) of at most `run_limit` tokens."""
        settings = self.settings
        most = settings.prompt_lookup_num_tokens if settings.max_new_tokens - generated > 1 else 0
        if run_limit != float("inf"):
            most = min(most, int(run_limit) - 1)
        sequence = self.history[: self.prompt_len + generated]
        return find_drafts(sequence, most, settings.max_matching_ngram_size, self.host_eos, self.forbidden)

    def choose(self, logits: torch.Tensor, drafts: torch.Tensor, generated: int,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A token after each row of a step's logits (row i: after the sequence and drafts[:i]): the best,
        or drawn all at once as transformers draws them. Returns (scores, chosen)."""
        length = self.prompt_len + generated
        self.sequences[0, length : length + logits.shape[0] - 1] = drafts.to(self.sequences.device)
        raw = logits.float()
        scores = torch.cat(
            [self.scores(raw[i : i + 1], self.sequences[:, : length + i]) for i in range(logits.shape[0])]
        )
        if self.settings.do_sample:
            return scores, torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        return scores, scores.argmax(dim=-1)

    def accept(self, position: int, token: int) -> None:
        """Token `token` at `position` of the sequence."""
        self.sequences[0, position] = self.history[position] = token


def check_prompt_lookup(model: Any, input_ids: torch.Tensor, settings: GenerationSettings) -> None:
    """One prompt, whose sequence stays within a window every layer has (a step of several tokens reads
    the columns before it, which such a cache lets go of)."""
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"prompt_lookup_num_tokens takes one prompt per generate() call (as transformers), got a batch of "
            f"{input_ids.shape[0]}"
        )
    windows = model.spec.layer_windows
    # The longest sequence a step can run: the prompt, the new tokens, a last step's drafts past them.
    longest = input_ids.shape[1] + settings.max_new_tokens + settings.prompt_lookup_num_tokens
    if None not in windows and longest > max(windows):
        raise ValueError(
            f"prompt_lookup_num_tokens under a sliding window on every layer takes sequences within the window "
            f"({max(windows)} tokens): this prompt, max_new_tokens and the drafts come to {longest} (the cache "
            "lets go of the columns before the window, and a step of several tokens reads them)"
        )


def prompt_lookup(request: GenerationRequest) -> GenerateOutput:
    """transformers' prompt lookup decoding: each step runs the last token and up to
    prompt_lookup_num_tokens drafts (find_drafts) through the model, chooses a token after each (greedy:
    the best; sampling: all of them drawn at once, as transformers draws them) and keeps the drafts chosen
    and the token after them. Greedy, that is greedy decoding's tokens, in as many steps as it takes
    drafts to miss. A step without drafts is a plain decode step (with cuda_graph, a replay of the decode
    graph); a step with drafts runs eagerly. Stopping criteria are checked after each token, as without
    drafts."""
    model, input_ids, settings, streamer = (
        request.model,
        request.input_ids,
        request.settings,
        request.streamer,
    )
    check_prompt_lookup(model, input_ids, settings)
    device = input_ids.device
    rules = request.token_rules()
    criteria = stopping_criteria(settings)
    logits, session = request.prefill(1)
    captures_before = session.graph_captures()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    lookup = PromptLookup(input_ids, settings, rules, session.prompt_start, eos_ids(settings, device),
                          model.spec.vocab_size)  # fmt: skip
    record = StepRecord()
    generated = steps = accepted = 0
    # As transformers' first step, the prompt's own drafts: the rows of `logits` past the first follow them.
    drafts = lookup.drafts(0, session.run_limit())
    if drafts.numel():
        logits = torch.cat((logits, session.decode_run(drafts.to(device))))
        steps += 1
    ran_last = (
        0  # 1 where the step's run began with the token before its drafts (the prefill ran the prompt's last)
    )
    while True:
        kept, hits, finished = _keep_chosen(
            lookup, logits, drafts, generated, request.generator, criteria, streamer, record
        )
        generated, accepted = generated + kept, accepted + hits
        if session.in_run():  # the run's tokens that stand: the one it ran after, and the drafts kept
            session.keep_run(ran_last + kept - 1)
        if finished:
            break
        drafts = lookup.drafts(generated, session.run_limit())
        token = lookup.sequences[0, lookup.prompt_len + generated - 1 : lookup.prompt_len + generated]
        if drafts.numel():
            logits, ran_last = session.decode_run(torch.cat((token, drafts.to(device)))), 1
        else:  # no draft: a plain decode step (its kernel reads the cache as it lies; a CUDA graph replays it)
            logits = session.decode(token)
        steps += 1
    sequences = lookup.sequences[:, : lookup.prompt_len + generated]
    return request.finish_one_beam(session, sequences, record, captures_before, decode_steps=steps,
                                   accepted_drafts=accepted)  # fmt: skip


def _keep_chosen(
    lookup: PromptLookup,
    logits: torch.Tensor,
    drafts: torch.Tensor,
    generated: int,
    generator: torch.Generator | None,
    criteria: list[Any],
    streamer: Any,
    record: StepRecord,
) -> tuple[int, int, bool]:
    """Chooses a token after each row of a step's logits and keeps them up to the first that is not the
    draft it follows, or that ends the generation: (tokens kept, drafts among them, finished). The last
    row follows every draft, so a step keeps at least one token and at most all."""
    settings = lookup.settings
    scores, chosen = lookup.choose(logits, drafts, generated, generator)
    length = lookup.prompt_len + generated
    hits = 0
    for row, token_id in enumerate(chosen.tolist()):
        lookup.accept(length + row, token_id)
        record.step_times.append(time.perf_counter())
        if settings.output_logits:  # a copy: processors may write into their scores
            record.logits.append(logits[row : row + 1].to(torch.float32, copy=True))
        if settings.output_scores:
            record.scores.append(scores[row : row + 1])
        if streamer is not None:
            streamer.put(chosen[row : row + 1].cpu())
        finished = token_id in lookup.eos_set or generated + row + 1 == settings.max_new_tokens
        if criteria and not finished:
            sequence = lookup.sequences[:, : length + row + 1]
            finished = bool(criteria_met(criteria, sequence, record.scores_so_far(settings))[0])
        hit = row < drafts.numel() and token_id == int(drafts[row])
        hits += hit
        if finished or not hit:
            return row + 1, hits, finished
    raise AssertionError("the last row of a step follows no draft")
