"""Greedy, sampling and beam search over the segment KV cache, with transformers' argument names.

xpu_coopt owns this loop (rather than riding on transformers' generate) because transformers expands the
prompt to every beam before prefill and copies the whole cache at each beam step; here the prompt is
prefilled once per request and a beam step reorders integers. The arithmetic of each decision (logits
processors, beam bookkeeping, length penalty, early stopping) follows transformers 5 so that outputs match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from xpu_coopt.cache.prefix_cache import PrefixCache
from xpu_coopt.generation.logits_processing import criteria_met, process, renormalize, stopping_criteria, warp
from xpu_coopt.generation.prompt_lookup import find_drafts
from xpu_coopt.generation.settings import GenerationSettings, resolve_settings
from xpu_coopt.generation.token_rules import TokenRules
from xpu_coopt.generation.transformers_release import BEAM_SAMPLES_SORTED


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [N * num_return_sequences, prompt + generated]
    sequences_scores: torch.Tensor | None = None  # beam search with output_scores: length-normalised scores
    scores: tuple[torch.Tensor, ...] | None = None  # output_scores: processed scores of each step
    kv_cache_bytes: int = 0  # bytes the KV cache held
    # time.perf_counter() right after each step's tokens were chosen (index 0: the first token)
    step_times: list[float] = field(default_factory=list)
    logits: tuple[torch.Tensor, ...] | None = None  # output_logits: each step's raw logits, float32
    # CUDA graph captures of the decode step this generation made: 1 with cuda_graph, 0 where it replayed a
    # kept graph, one more at each step that grew a paged pool (xpu_coopt.cache.decode_graph)
    decode_graph_captures: int = 0
    # prompt_lookup_num_tokens: the decode steps run, and the draft tokens they kept
    decode_steps: int = 0
    accepted_drafts: int = 0


def _graph_captures(cache: Any) -> int:
    """Captures so far of the decode graph over the cache (0 without one)."""
    return 0 if cache.decode_graph is None else cache.decode_graph.captures


def generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, prompt_length]")
    input_ids = input_ids.to(model.device)
    prefix_cache = _prefix_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
    settings = resolve_settings(model, input_ids.shape[1], kwargs)
    streamer = kwargs.get("streamer")
    generator = kwargs.get("generator")
    if streamer is not None and (
        settings.num_beams > 1 or input_ids.shape[0] * settings.num_return_sequences > 1
    ):
        raise ValueError("streamer supports one sequence: batch size 1 without beam search (as transformers)")
    with torch.inference_mode():
        if settings.num_beams > 1:
            output = _beam_search(model, input_ids, attention_mask, settings, generator, prefix_cache)
        elif settings.prompt_lookup_num_tokens is not None:
            _check_prompt_lookup(model, input_ids, settings)
            output = _prompt_lookup(
                model, input_ids, attention_mask, settings, streamer, generator, prefix_cache
            )
        else:
            output = _sample(model, input_ids, attention_mask, settings, streamer, generator, prefix_cache)
    return output if settings.return_dict_in_generate else output.sequences


def _prefix_cache(cache: Any, past_key_values: Any) -> PrefixCache | None:
    """generate()'s `cache` (transformers 5.24's name) or `past_key_values` (its older one): None, or a
    PrefixCache (transformers' cache classes hold K/V in their own layout, which xpu_coopt's kernels do
    not read)."""
    if cache is not None and past_key_values is not None:
        raise TypeError("generate() got both cache and past_key_values: they name the same argument")
    name, given = ("cache", cache) if cache is not None else ("past_key_values", past_key_values)
    if given is None or isinstance(given, PrefixCache):
        return given
    raise TypeError(
        f"{name} must be an xpu_coopt.PrefixCache, not {type(given).__name__}: "
        "pass xpu_coopt.PrefixCache() where transformers takes a DynamicCache"
    )


def _eos_ids(settings: GenerationSettings, device: torch.device) -> torch.Tensor:
    """The EOS ids as a device tensor, made once per generation: per-step host-to-device copies would each
    wait for the work queued before them, a decode step included."""
    return torch.tensor(settings.eos_token_id or [], dtype=torch.long, device=device)


class _HostFlags:
    """Device booleans on their way to the host. The copy is queued before the next decode step and read
    after it: the host then waits for the flags only, not for the step queued behind them, and issues the
    next step's bookkeeping while the device still runs that step."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.values = flags.to("cpu", non_blocking=True)
        self.ready = None
        if flags.device.type != "cpu":
            self.ready = torch.Event(device=flags.device)
            self.ready.record()

    def read(self) -> list[bool]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def _sample(
    model, input_ids, attention_mask, settings: GenerationSettings, streamer, generator, prefix_cache
) -> GenerateOutput:
    """Greedy or sampling; sampling num_return_sequences > 1 sequences of each prompt draws them side by
    side, as transformers does (row order: each prompt's samples together), over one prefill of the prompt
    whose K/V all its samples share (the segment cache's beams, never reordered)."""
    samples = settings.num_return_sequences
    rules = TokenRules.of(settings, model.spec.vocab_size, input_ids.device)  # its errors before the prefill
    criteria = stopping_criteria(settings)  # before the prefill: max_time counts it, as in transformers
    logits, cache = model.prefill(
        input_ids,
        attention_mask,
        samples,
        settings.max_new_tokens,
        reuse_kept_cache=True,
        prefix_cache=prefix_cache,
    )
    captures_before = _graph_captures(cache)  # a kept cache's graph has captured before
    prompt_start = cache.prompt_start  # each prompt's first column after its left padding
    if samples > 1:
        logits = logits.repeat_interleave(samples, dim=0)
        input_ids = input_ids.repeat_interleave(samples, dim=0)
        prompt_start = prompt_start.repeat_interleave(samples)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    batch, prompt_len = input_ids.shape
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    eos = _eos_ids(settings, input_ids.device)
    sequences = torch.empty(
        (batch, prompt_len + settings.max_new_tokens), dtype=torch.long, device=input_ids.device
    )
    sequences[:, :prompt_len] = input_ids
    all_scores: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []
    step_times: list[float] = []
    for step in range(settings.max_new_tokens):
        length = prompt_len + step
        if settings.output_logits:  # a copy: the decode graph's output buffer is overwritten by the next step
            all_logits.append(logits.to(torch.float32, copy=True))
        scores = process(logits.float(), sequences[:, :length], prompt_start, eos, step, settings, rules)
        if settings.do_sample:
            scores = renormalize(warp(scores, settings), settings)
            next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            scores = renormalize(scores, settings)
            next_tokens = scores.argmax(dim=-1)
        if settings.output_scores:
            # Unprocessed float32 scores are the decode graph's output buffer, which the next step overwrites.
            all_scores.append(scores.clone() if scores is logits else scores)
        if eos.numel():  # as transformers: finished rows are padded only where EOS can finish them
            next_tokens = torch.where(unfinished, next_tokens, settings.pad_token_id)
        sequences[:, length] = next_tokens
        step_times.append(time.perf_counter())
        unfinished &= ~torch.isin(next_tokens, eos)
        if criteria:
            scores_so_far = all_scores if settings.output_scores else None
            unfinished &= ~criteria_met(criteria, sequences[:, : length + 1], scores_so_far)
        any_unfinished = _HostFlags(unfinished.any().view(1))
        last = step == settings.max_new_tokens - 1
        # The next step is queued before anything waits for the device (the streamer, the stop check), so
        # the GPU never idles while the host decides; after the last EOS that one step is discarded.
        if not last:
            next_logits = model.decode(next_tokens, cache)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if last or not any_unfinished.read()[0]:
            break
        logits = next_logits
    return _one_beam_output(
        model, cache, settings, streamer, prefix_cache, sequences[:, : prompt_len + len(step_times)], step_times,
        all_scores, all_logits, captures_before,
    )  # fmt: skip


def _one_beam_output(
    model, cache, settings: GenerationSettings, streamer, prefix_cache, sequences: torch.Tensor,
    step_times: list[float], all_scores: list[torch.Tensor], all_logits: list[torch.Tensor],
    captures_before: int, **counts: int,
) -> GenerateOutput:  # fmt: skip
    """The end of a generation of one beam per prompt (_sample, _prompt_lookup), its `sequences` cut after
    their last token: the streamer ended, the PrefixCache given the K/V it keeps, the cache kept for the next
    generate() (with its decode graph), and the output. counts: GenerateOutput's counters of the run."""
    if streamer is not None:
        streamer.end()
    if prefix_cache is not None:
        prefix_cache.hold(cache, sequences[0])
    model.keep_cache(cache)
    scores = tuple(all_scores) if settings.output_scores else None
    logits = tuple(all_logits) if settings.output_logits else None
    captures = _graph_captures(cache) - captures_before
    return GenerateOutput(sequences, None, scores, cache.nbytes(), step_times, logits, captures, **counts)


def _check_prompt_lookup(model, input_ids: torch.Tensor, settings: GenerationSettings) -> None:
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


def _prompt_lookup(
    model, input_ids, attention_mask, settings: GenerationSettings, streamer, generator, prefix_cache
):
    """transformers' prompt lookup decoding: each step runs the last token and up to
    prompt_lookup_num_tokens drafts (find_drafts) through the model, chooses a token after each (greedy:
    the best; sampling: all of them drawn at once, as transformers draws them) and keeps the drafts chosen
    and the token after them. Greedy, that is greedy decoding's tokens, in as many steps as it takes
    drafts to miss. A step without drafts is a plain decode step (with cuda_graph, a replay of the decode
    graph); a step with drafts runs eagerly. Stopping criteria are checked after each token, as without
    drafts."""
    device, vocab = input_ids.device, model.spec.vocab_size
    rules = TokenRules.of(settings, vocab, device)
    criteria = stopping_criteria(settings)
    logits, cache = model.prefill(
        input_ids,
        attention_mask,
        1,
        settings.max_new_tokens,
        reuse_kept_cache=True,
        prefix_cache=prefix_cache,
    )
    captures_before = _graph_captures(cache)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    prompt_len = input_ids.shape[1]
    eos = _eos_ids(settings, device)
    host_eos, eos_set = eos.cpu(), set(settings.eos_token_id or [])
    # Room for the drafts of a step that runs past max_new_tokens (below).
    room = prompt_len + settings.max_new_tokens + settings.prompt_lookup_num_tokens
    sequences = torch.empty((1, room), dtype=torch.long, device=device)
    sequences[:, :prompt_len] = input_ids
    history = sequences[0].cpu()  # the sequence on the host, where the drafts are looked up

    def chosen_scores(row_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The scores a token is chosen from after `tokens` [1, length]: processed (and warped when
        sampling) as without drafts."""
        scores = process(
            row_logits, tokens, cache.prompt_start, eos, tokens.shape[1] - prompt_len, settings, rules
        )
        return renormalize(warp(scores, settings) if settings.do_sample else scores, settings)

    def forbidden(tokens: torch.Tensor, token: int) -> bool:
        """transformers' check of a draft: the processors leave it no chance on uniform logits."""
        uniform = torch.ones((1, vocab), dtype=torch.float32, device=device)
        score = float(chosen_scores(uniform, tokens.to(device).view(1, -1))[0, token])
        return score in (float("-inf"), torch.finfo(torch.float32).min)

    def lookup(generated: int) -> torch.Tensor:
        """The drafts after the sequence so far. As transformers: drafts past max_new_tokens run too (their
        tokens are dropped), so that a sampled step draws as many rows as its; none for the last token;
        and a decode graph's cache cannot grow."""
        most = settings.prompt_lookup_num_tokens if settings.max_new_tokens - generated > 1 else 0
        if cache.segment_lens is not None:
            most = min(most, cache.capacity - cache.response_len - 1)
        sequence = history[: prompt_len + generated]
        return find_drafts(sequence, most, settings.max_matching_ngram_size, host_eos, forbidden)

    all_scores: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []
    step_times: list[float] = []
    generated = steps = accepted = 0
    # As transformers' first step, the prompt's own drafts: their rows follow the prefill's.
    drafts = lookup(0)  # those after which the rows of `logits` past the first choose
    if drafts.numel():
        logits = torch.cat((logits, model.decode_run(drafts.to(device), cache)))
        steps += 1
    # 1 where the step's run began with the token before its drafts (the prefill ran the prompt's last)
    ran_last = 0
    while True:
        length = prompt_len + generated
        rows = logits.shape[0]  # row i: the token after the sequence and drafts[:i]
        sequences[0, length : length + rows - 1] = drafts.to(device)  # what each row's processors see
        raw = logits.float()
        scores = torch.cat([chosen_scores(raw[i : i + 1], sequences[:, : length + i]) for i in range(rows)])
        if settings.do_sample:
            chosen = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            chosen = scores.argmax(dim=-1)
        for row, token_id in enumerate(chosen.tolist()):
            sequences[0, length + row] = history[length + row] = token_id
            generated += 1
            step_times.append(time.perf_counter())
            if settings.output_logits:  # a copy: processors may write into their scores
                all_logits.append(raw[row : row + 1].clone())
            if settings.output_scores:
                all_scores.append(scores[row : row + 1])
            if streamer is not None:
                streamer.put(chosen[row : row + 1].cpu())
            finished = token_id in eos_set or generated == settings.max_new_tokens
            if criteria and not finished:
                scores_so_far = all_scores if settings.output_scores else None
                finished = bool(criteria_met(criteria, sequences[:, : length + row + 1], scores_so_far)[0])
            hit = row < drafts.numel() and token_id == int(drafts[row])
            accepted += hit
            if finished or not hit:
                break
        if cache.run_length:  # the run's tokens that stand: the one it ran after, and the drafts kept
            cache.end_token_run(ran_last + row)
        if finished:
            break
        drafts = lookup(generated)
        token = sequences[0, prompt_len + generated - 1 : prompt_len + generated]
        if drafts.numel():
            logits = model.decode_run(torch.cat((token, drafts.to(device))), cache)
            ran_last = 1
        else:  # no draft: a plain decode step (its kernel reads the cache as it lies; a CUDA graph replays it)
            logits = model.decode(token, cache)
        steps += 1
    return _one_beam_output(
        model, cache, settings, streamer, prefix_cache, sequences[:, : prompt_len + generated], step_times,
        all_scores, all_logits, captures_before, decode_steps=steps, accepted_drafts=accepted,
    )  # fmt: skip


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor [R, K, ...], indices [R, J] -> [R, J, ...]."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def _beam_search(
    model, input_ids, attention_mask, settings: GenerationSettings, generator, prefix_cache
) -> GenerateOutput:
    """transformers 5's vectorised beam search, with the prompt prefilled once per request; with do_sample,
    its beam sampling (warped log-probabilities, candidates drawn instead of taken best first)."""
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    beams = settings.num_beams
    max_length = prompt_len + settings.max_new_tokens
    eos = _eos_ids(settings, device)
    beams_to_keep = max(2, 1 + eos.numel()) * beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < beams
    fill = (settings.pad_token_id or settings.eos_token_id[0]) if settings.eos_token_id else -1

    running_sequences = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
    running_sequences[:, :, :prompt_len] = input_ids[:, None, :]
    sequences = running_sequences.clone()
    running_scores = torch.zeros((batch, beams), dtype=torch.float, device=device)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, beams), -1e9, dtype=torch.float, device=device)
    is_finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_beam_indices = torch.full(
        (batch, beams, settings.max_new_tokens), -1, dtype=torch.int32, device=device
    )
    beam_indices = running_beam_indices.clone()
    batch_offset = torch.arange(batch, device=device).view(-1, 1) * beams
    all_scores: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []
    step_times: list[float] = []
    rules = TokenRules.of(settings, model.spec.vocab_size, device)  # its errors before the prefill
    criteria = stopping_criteria(settings)  # before the prefill: max_time counts it, as in transformers

    logits, cache = model.prefill(
        input_ids,
        attention_mask,
        beams,
        settings.max_new_tokens,
        reuse_kept_cache=True,
        prefix_cache=prefix_cache,
    )
    captures_before = _graph_captures(cache)  # a kept cache's graph has captured before
    logits = logits.repeat_interleave(beams, dim=0)  # every beam of a request starts from the same prompt
    prompt_start = cache.prompt_start.repeat_interleave(beams)  # each row's first column after its padding
    cur_len = prompt_len
    while True:
        if settings.output_logits:
            all_logits.append(logits.to(torch.float32, copy=True))
        history = running_sequences[:, :, :cur_len].reshape(batch * beams, cur_len)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = process(log_probs, history, prompt_start, eos, cur_len - prompt_len, settings, rules)
        if settings.do_sample:  # each warper keeps a token beyond the EOS ids, as transformers' beam sampling
            log_probs = warp(log_probs, settings, keep=max(2, eos.numel() + 1))
        log_probs = renormalize(log_probs, settings)
        if settings.output_scores:
            all_scores.append(log_probs)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.view(batch, beams, vocab) + running_scores[:, :, None]
        if settings.do_sample:
            accumulated = log_probs.view(batch, -1)
            topk_indices = torch.multinomial(accumulated.softmax(dim=-1), beams_to_keep, generator=generator)
            topk_log_probs = accumulated.gather(1, topk_indices)
            if BEAM_SAMPLES_SORTED:
                topk_log_probs, order = topk_log_probs.sort(dim=-1, descending=True)
                topk_indices = topk_indices.gather(1, order)
        else:
            topk_log_probs, topk_indices = torch.topk(log_probs.view(batch, -1), k=beams_to_keep)
        topk_beam = topk_indices // vocab
        topk_running_beam_indices = _gather_beams(running_beam_indices, topk_beam)
        topk_sequences = _gather_beams(running_sequences, topk_beam)
        topk_sequences[:, :, cur_len] = topk_indices % vocab
        topk_running_beam_indices[:, :, cur_len - prompt_len] = (topk_beam + batch_offset).to(torch.int32)

        # Stopping criteria of each candidate: length limit, an EOS as its last token, the caller's criteria.
        hits_stop = torch.isin(topk_sequences[:, :, cur_len], eos) | (cur_len + 1 >= max_length)
        if criteria:
            candidates = topk_sequences[:, :, : cur_len + 1].reshape(batch * beams_to_keep, cur_len + 1)
            met = criteria_met(criteria, candidates, all_scores if settings.output_scores else None)
            hits_stop |= met.view(batch, beams_to_keep)

        # Running beams for the next step: the best candidates that did not stop.
        running_candidates = topk_log_probs + hits_stop.float() * -1.0e9
        next_indices = torch.topk(running_candidates, k=beams)[1]
        running_sequences = _gather_beams(topk_sequences, next_indices)
        running_scores = _gather_beams(running_candidates, next_indices)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_indices)

        # Finished hypotheses: candidates among the top num_beams that stopped, scored with the length penalty.
        just_finished = hits_stop & top_num_beam_mask[None, :]
        finished_scores = topk_log_probs / ((cur_len + 1 - prompt_len) ** settings.length_penalty)
        batch_full = is_finished.all(dim=-1, keepdim=True) & (settings.early_stopping is True)
        finished_scores = finished_scores + batch_full.float() * -1.0e9
        finished_scores = finished_scores + (~improvable).float() * -1.0e9
        finished_scores = finished_scores + (~just_finished) * -1.0e9
        merged_scores = torch.cat((beam_scores, finished_scores), dim=1)
        best = torch.topk(merged_scores, k=beams)[1]
        sequences = _gather_beams(torch.cat((sequences, topk_sequences), dim=1), best)
        beam_scores = _gather_beams(merged_scores, best)
        beam_indices = _gather_beams(torch.cat((beam_indices, topk_running_beam_indices), dim=1), best)
        is_finished = _gather_beams(torch.cat((is_finished, just_finished), dim=1), best)

        parents = running_beam_indices[..., cur_len - prompt_len].reshape(-1)
        cur_len += 1
        step_times.append(time.perf_counter())

        # Early-stop heuristic: can a running beam still beat the worst finished one?
        if settings.early_stopping == "never" and settings.length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_length**settings.length_penalty)
        worst_finished = torch.where(is_finished, beam_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        last = cur_len >= max_length  # known on the host: every candidate hit the length limit
        stop_flags = _HostFlags(torch.stack((is_finished.all(), improvable.any(), hits_stop.all())))
        # As in _sample: the next step is queued before the one wait for the stop flags; the parents come
        # from this request's own top-k, so the cache need not check them (a host sync of its own).
        if not last:
            cache.reorder(parents, check=False)
            next_logits = model.decode(running_sequences[:, :, cur_len - 1].reshape(-1), cache)
        all_finished, any_improvable, all_stopped = stop_flags.read()
        open_beams = not (all_finished and settings.early_stopping is True)
        if last or not (any_improvable and open_beams and not all_stopped):
            break
        logits = next_logits

    if prefix_cache is not None:
        prefix_cache.hold(cache, input_ids[0])  # the prompt's K/V: beams share them
    model.keep_cache(cache)
    keep = settings.num_return_sequences
    sequences = sequences[:, :keep].reshape(batch * keep, -1)
    scores = beam_scores[:, :keep].reshape(-1)
    generated_lengths = (beam_indices[:, :keep].reshape(batch * keep, -1) + 1).bool().sum(dim=1)
    sequences = sequences[:, : prompt_len + int(generated_lengths.max())]
    return GenerateOutput(
        sequences,
        scores if settings.output_scores else None,
        tuple(all_scores) if settings.output_scores else None,
        cache.nbytes(),
        step_times,
        tuple(all_logits) if settings.output_logits else None,
        _graph_captures(cache) - captures_before,
    )
