"""Beam search and beam sampling: transformers 5's vectorised beam search, with each prompt prefilled once.

The arithmetic of each decision (candidates, length penalty, early stopping) follows transformers so that
the outputs match. What differs is the cache: transformers expands the prompt to every beam before its
prefill and copies the whole cache at each step; here the prompt is prefilled once per request and a step
reorders integers (CacheSession.reorder).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from xpu_coopt.generation.logits_processing import LogitsProcessing, criteria_met, stopping_criteria
from xpu_coopt.generation.output import GenerateOutput, HostFlags, StepRecord, eos_ids
from xpu_coopt.generation.request import GenerationRequest
from xpu_coopt.generation.settings import GenerationSettings
from xpu_coopt.generation.transformers_release import BEAM_SAMPLES_SORTED

# Added to a score to rule its candidate out, as transformers does.
RULED_OUT = -1.0e9


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor [R, K, ...], indices [R, J] -> [R, J, ...]."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


@dataclass
class BeamState:
    """The running and finished beams of R requests of `beams` beams each, sequences up to max_length:
    running_* the beams still extended, sequences / beam_scores / beam_indices / is_finished the best
    finished hypotheses, improvable whether a request's running beams can still beat them."""

    running_sequences: torch.Tensor  # [R, beams, max_length] int64
    running_scores: torch.Tensor  # [R, beams] float32: accumulated log-probabilities
    running_beam_indices: torch.Tensor  # [R, beams, max_new_tokens] int32: each step's parent row
    sequences: torch.Tensor
    beam_scores: torch.Tensor  # length-penalised
    beam_indices: torch.Tensor
    is_finished: torch.Tensor  # [R, beams] bool
    improvable: torch.Tensor  # [R, 1] bool

    @classmethod
    def start(cls, input_ids: torch.Tensor, beams: int, max_new_tokens: int, fill: int) -> BeamState:
        """Every request's beams at its prompt, the first of them alone running (the others at -1e9)."""
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        running = torch.full(
            (batch, beams, prompt_len + max_new_tokens), fill, dtype=torch.long, device=device
        )
        running[:, :, :prompt_len] = input_ids[:, None, :]
        scores = torch.zeros((batch, beams), dtype=torch.float, device=device)
        scores[:, 1:] = RULED_OUT
        indices = torch.full((batch, beams, max_new_tokens), -1, dtype=torch.int32, device=device)
        return cls(running, scores, indices, running.clone(), torch.full((batch, beams), RULED_OUT, device=device),
                   indices.clone(), torch.zeros((batch, beams), dtype=torch.bool, device=device),
                   torch.ones((batch, 1), dtype=torch.bool, device=device))  # fmt: skip


@dataclass
class Candidates:
    """A step's best continuations of every request's beams: [R, K] log-probabilities, sequences
    [R, K, max_length], parent indices, and whether each stops (EOS, length, the caller's criteria)."""

    log_probs: torch.Tensor
    sequences: torch.Tensor
    beam_indices: torch.Tensor
    stops: torch.Tensor


@dataclass(frozen=True)
class BeamSearch:
    """One generation's constants: `beams` beams of prompts `prompt_len` long, `keep` candidates a step
    (enough that `beams` of them do not stop at an EOS), the settings, the EOS ids and the generator."""

    settings: GenerationSettings
    beams: int
    keep: int
    prompt_len: int
    eos: torch.Tensor
    criteria: list[Any]
    generator: torch.Generator | None

    def candidates(
        self, state: BeamState, log_probs: torch.Tensor, length: int, record: StepRecord
    ) -> Candidates:
        """The `keep` best (or drawn) continuations of each request's beams, from log_probs [R * beams,
        vocab] (processed and warped) added to the running scores; `length`: the sequences' length."""
        batch, vocab = state.running_scores.shape[0], log_probs.shape[-1]
        log_probs = log_probs.view(batch, self.beams, vocab) + state.running_scores[:, :, None]
        flat = log_probs.view(batch, -1)
        if self.settings.do_sample:
            indices = torch.multinomial(flat.softmax(dim=-1), self.keep, generator=self.generator)
            top_log_probs = flat.gather(1, indices)
            if BEAM_SAMPLES_SORTED:
                top_log_probs, order = top_log_probs.sort(dim=-1, descending=True)
                indices = indices.gather(1, order)
        else:
            top_log_probs, indices = torch.topk(flat, k=self.keep)
        parents = indices // vocab
        sequences = _gather_beams(state.running_sequences, parents)
        sequences[:, :, length] = indices % vocab
        beam_indices = _gather_beams(state.running_beam_indices, parents)
        rows = torch.arange(batch, device=parents.device).view(-1, 1) * self.beams
        beam_indices[:, :, length - self.prompt_len] = (parents + rows).to(torch.int32)
        stops = torch.isin(sequences[:, :, length], self.eos) | (
            length + 1 >= state.running_sequences.shape[2]
        )
        if self.criteria:
            flat_sequences = sequences[:, :, : length + 1].reshape(batch * self.keep, length + 1)
            met = criteria_met(self.criteria, flat_sequences, record.scores_so_far(self.settings))
            stops |= met.view(batch, self.keep)
        return Candidates(top_log_probs, sequences, beam_indices, stops)

    def advance(self, state: BeamState, candidates: Candidates, length: int) -> BeamState:
        """The next step's running beams (the best candidates that did not stop) and finished hypotheses
        (candidates among the top `beams` that stopped, scored with the length penalty); `length`: the
        sequences' length before the candidates' token."""
        settings = self.settings
        running_scores = candidates.log_probs + candidates.stops.float() * RULED_OUT
        best_running = torch.topk(running_scores, k=self.beams)[1]
        top_beams = torch.arange(self.keep, device=running_scores.device) < self.beams
        just_finished = candidates.stops & top_beams[None, :]
        finished_scores = candidates.log_probs / ((length + 1 - self.prompt_len) ** settings.length_penalty)
        batch_full = state.is_finished.all(dim=-1, keepdim=True) & (settings.early_stopping is True)
        finished_scores = finished_scores + batch_full.float() * RULED_OUT
        finished_scores = finished_scores + (~state.improvable).float() * RULED_OUT
        finished_scores = finished_scores + (~just_finished) * RULED_OUT
        merged_scores = torch.cat((state.beam_scores, finished_scores), dim=1)
        best = torch.topk(merged_scores, k=self.beams)[1]
        new = BeamState(
            _gather_beams(candidates.sequences, best_running),
            _gather_beams(running_scores, best_running),
            _gather_beams(candidates.beam_indices, best_running),
            _gather_beams(torch.cat((state.sequences, candidates.sequences), dim=1), best),
            _gather_beams(merged_scores, best),
            _gather_beams(torch.cat((state.beam_indices, candidates.beam_indices), dim=1), best),
            _gather_beams(torch.cat((state.is_finished, just_finished), dim=1), best),
            state.improvable,
        )
        new.improvable = self._improvable(new, length + 1)
        return new

    def _improvable(self, state: BeamState, length: int) -> torch.Tensor:
        """transformers' early-stop heuristic: whether a request's best running beam, at `length` (with
        early_stopping="never", at the longest length), can still beat its worst finished hypothesis."""
        settings = self.settings
        if settings.early_stopping == "never" and settings.length_penalty > 0.0:
            best_length = state.running_sequences.shape[2] - self.prompt_len
        else:
            best_length = length - self.prompt_len
        best_running = state.running_scores[:, :1] / (best_length**settings.length_penalty)
        worst_finished = torch.where(
            state.is_finished, state.beam_scores.min(dim=1, keepdim=True)[0], RULED_OUT
        )
        return state.improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)

    def stop_flags(self, state: BeamState, candidates: Candidates) -> HostFlags:
        """Whether every hypothesis finished, any can improve, every candidate stopped: on their way to the
        host while the next step runs."""
        return HostFlags(
            torch.stack((state.is_finished.all(), state.improvable.any(), candidates.stops.all()))
        )

    def done(self, flags: HostFlags) -> bool:
        all_finished, any_improvable, all_stopped = flags.read()
        open_beams = not (all_finished and self.settings.early_stopping is True)
        return not (any_improvable and open_beams and not all_stopped)


def beam_search(request: GenerationRequest) -> GenerateOutput:
    """transformers 5's vectorised beam search, with the prompt prefilled once per request; with do_sample,
    its beam sampling (warped log-probabilities, candidates drawn instead of taken best first)."""
    input_ids, settings, prefix_cache = request.input_ids, request.settings, request.prefix_cache
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    beams = settings.num_beams
    eos = eos_ids(settings, device)
    fill = (settings.pad_token_id or settings.eos_token_id[0]) if settings.eos_token_id else -1
    rules = request.token_rules()
    # before the prefill: max_time counts it, as in transformers
    search = BeamSearch(settings, beams, max(2, 1 + eos.numel()) * beams, prompt_len, eos,
                        stopping_criteria(settings), request.generator)  # fmt: skip
    state = BeamState.start(input_ids, beams, settings.max_new_tokens, fill)
    record = StepRecord()
    logits, session = request.prefill(beams)
    captures_before = session.graph_captures()  # a kept session's graph has captured before
    logits = logits.repeat_interleave(beams, dim=0)  # every beam of a request starts from the same prompt
    prompt_start = session.prompt_start.repeat_interleave(beams)  # each row's first column after its padding
    processing, keep = LogitsProcessing(settings, rules, eos, prompt_start), max(2, eos.numel() + 1)
    for length in range(prompt_len, prompt_len + settings.max_new_tokens):
        if settings.output_logits:
            record.logits.append(logits.to(torch.float32, copy=True))
        history = state.running_sequences[:, :, :length].reshape(batch * beams, length)
        # each warper keeps a token beyond the EOS ids, as transformers' beam sampling
        log_probs = processing.scores(
            F.log_softmax(logits.float(), dim=-1), history, length - prompt_len, keep
        )
        if settings.output_scores:
            record.scores.append(log_probs)
        candidates = search.candidates(state, log_probs, length, record)
        state = search.advance(state, candidates, length)
        record.step_times.append(time.perf_counter())
        flags = search.stop_flags(state, candidates)
        last = length + 1 == prompt_len + settings.max_new_tokens  # every candidate hit the length limit
        # As in sampling: the next step is queued before the one wait for the stop flags.
        if not last:
            session.reorder(state.running_beam_indices[..., length - prompt_len].reshape(-1))
            next_logits = session.decode(state.running_sequences[:, :, length].reshape(-1))
        if last or search.done(flags):
            break
        logits = next_logits
    if prefix_cache is not None:
        session.hold(prefix_cache, input_ids[0])  # the prompt's K/V: beams share them
    request.model.keep_cache(session)
    return _best_hypotheses(state, settings, prompt_len, record, session, captures_before)


def _best_hypotheses(state: BeamState, settings: GenerationSettings, prompt_len: int, record: StepRecord,
                     session, captures_before: int) -> GenerateOutput:  # fmt: skip
    """num_return_sequences best finished hypotheses of each request, cut after the longest."""
    batch, keep = state.sequences.shape[0], settings.num_return_sequences
    sequences = state.sequences[:, :keep].reshape(batch * keep, -1)
    scores = state.beam_scores[:, :keep].reshape(-1)
    generated_lengths = (state.beam_indices[:, :keep].reshape(batch * keep, -1) + 1).bool().sum(dim=1)
    sequences = sequences[:, : prompt_len + int(generated_lengths.max())]
    return record.output(sequences, session, captures_before, settings, sequences_scores=scores)
