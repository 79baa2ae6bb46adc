"""Greedy decoding and sampling: one token a step for each sequence, transformers' processors and warpers."""

from __future__ import annotations

import time

import torch

from xpu_coopt.generation.logits_processing import LogitsProcessing, criteria_met, stopping_criteria
from xpu_coopt.generation.output import GenerateOutput, HostFlags, StepRecord, eos_ids
from xpu_coopt.generation.request import GenerationRequest


def sample(request: GenerationRequest) -> GenerateOutput:
    """Greedy or sampling; sampling num_return_sequences > 1 sequences of each prompt draws them side by
    side, as transformers does (row order: each prompt's samples together), over one prefill of the prompt
    whose K/V all its samples share (the segment cache's beams, never reordered)."""
    settings, input_ids, streamer = request.settings, request.input_ids, request.streamer
    samples = settings.num_return_sequences
    rules = request.token_rules()
    criteria = stopping_criteria(settings)  # before the prefill: max_time counts it, as in transformers
    logits, session = request.prefill(samples)
    captures_before = session.graph_captures()  # a kept session's graph has captured before
    prompt_start = session.prompt_start  # each prompt's first column after its left padding
    if samples > 1:
        logits = logits.repeat_interleave(samples, dim=0)
        input_ids = input_ids.repeat_interleave(samples, dim=0)
        prompt_start = prompt_start.repeat_interleave(samples)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    batch, prompt_len = input_ids.shape
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    eos = eos_ids(settings, input_ids.device)
    processing = LogitsProcessing(settings, rules, eos, prompt_start)
    sequences = torch.empty(
        (batch, prompt_len + settings.max_new_tokens), dtype=torch.long, device=input_ids.device
    )
    sequences[:, :prompt_len] = input_ids
    record = StepRecord()
    for step in range(settings.max_new_tokens):
        length = prompt_len + step
        next_tokens = _choose(logits, sequences[:, :length], step, processing, request.generator, record)
        if eos.numel():  # as transformers: finished rows are padded only where EOS can finish them
            next_tokens = torch.where(unfinished, next_tokens, settings.pad_token_id)
        sequences[:, length] = next_tokens
        record.step_times.append(time.perf_counter())
        unfinished &= ~torch.isin(next_tokens, eos)
        if criteria:
            unfinished &= ~criteria_met(criteria, sequences[:, : length + 1], record.scores_so_far(settings))
        any_unfinished = HostFlags(unfinished.any().view(1))
        last = step == settings.max_new_tokens - 1
        # The next step is queued before anything waits for the device (the streamer, the stop check), so
        # the GPU never idles while the host decides; after the last EOS that one step is discarded.
        if not last:
            next_logits = session.decode(next_tokens)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if last or not any_unfinished.read()[0]:
            break
        logits = next_logits
    sequences = sequences[:, : prompt_len + len(record.step_times)]
    return request.finish_one_beam(session, sequences, record, captures_before)


def _choose(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    step: int,
    processing: LogitsProcessing,
    generator: torch.Generator | None,
    record: StepRecord,
) -> torch.Tensor:
    """Each row's next token from its logits (the best, or drawn), recording the step's logits and
    scores where settings ask for them."""
    settings = processing.settings
    if settings.output_logits:  # a copy: the decode graph's output buffer is overwritten by the next step
        record.logits.append(logits.to(torch.float32, copy=True))
    scores = processing.scores(logits.float(), tokens, step)
    if settings.do_sample:
        next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
    else:
        next_tokens = scores.argmax(dim=-1)
    if settings.output_scores:
        # Unprocessed float32 scores are the decode graph's output buffer, which the next step overwrites.
        record.scores.append(scores.clone() if scores is logits else scores)
    return next_tokens
