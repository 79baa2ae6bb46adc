"""Greedy, sampling and beam search over the segment KV cache, with transformers' argument names.

xpu_coopt owns this loop (rather than riding on transformers' generate) because transformers expands the
prompt to every beam before prefill and copies the whole cache at each beam step; here the prompt is
prefilled once per request and a beam step reorders integers. The arithmetic of each decision (logits
processors, beam bookkeeping, length penalty, early stopping) follows transformers 5 so that outputs match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_ARGUMENTS = (
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping",
    "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id", "streamer", "generator",
    "return_dict_in_generate", "output_scores", "output_logits", "use_cache", "logits_processor", "stopping_criteria",
    "stop_strings", "max_time", "tokenizer", "generation_config",
)  # fmt: skip

# transformers' processors that generate() arguments build (the argument to pass instead of the object).
_BUILT_IN_PROCESSORS = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty", "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens", "MinLengthLogitsProcessor": "min_new_tokens",
    "TemperatureLogitsWarper": "temperature", "TopKLogitsWarper": "top_k", "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p", "EosTokenCriteria": "eos_token_id", "MaxLengthCriteria": "max_new_tokens",
    "MaxTimeCriteria": "max_time", "StopStringCriteria": "stop_strings",
}  # fmt: skip

# Fields of a model's generation_config that xpu_coopt neither uses nor needs to: bookkeeping only.
_IGNORED_CONFIG_FIELDS = {
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash", "use_cache",
    "cache_implementation", "cache_config", "return_legacy_cache", "output_attentions",
    "output_hidden_states", "decoder_start_token_id", "generation_kwargs",
    "is_assistant", "compile_config", "disable_compile", "trust_remote_code",
}  # fmt: skip


@dataclass
class GenerationSettings:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    # callables (input_ids [rows, length], scores [rows, vocab]) -> scores, as transformers' LogitsProcessor
    logits_processor: list[Any] = field(default_factory=list)
    # callables (input_ids [rows, length], scores) -> bool [rows], True where a row is done, as
    # transformers' StoppingCriteria; stop_strings and max_time add transformers' own criteria for them
    stopping_criteria: list[Any] = field(default_factory=list)
    stop_strings: str | list[str] | None = None
    max_time: float | None = None
    tokenizer: Any = None


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [N * num_return_sequences, prompt + generated]
    sequences_scores: torch.Tensor | None = None  # beam search with output_scores: length-normalised scores
    scores: tuple[torch.Tensor, ...] | None = None  # output_scores: processed scores of each step
    kv_cache_bytes: int = 0  # bytes the KV cache held
    # time.perf_counter() right after each step's tokens were chosen (index 0: the first token)
    step_times: list[float] = field(default_factory=list)
    logits: tuple[torch.Tensor, ...] | None = None  # output_logits: each step's raw logits, float32


def _config_defaults(generation_config: Any) -> dict[str, Any]:
    """Supported fields of the model's generation_config; ValueError for unsupported ones set away from default."""
    if generation_config is None:
        return {}
    from transformers import GenerationConfig

    base = GenerationConfig().to_dict()
    own = generation_config.to_dict()
    supported = {f.name for f in fields(GenerationSettings)} | {"max_length", "bos_token_id"}
    unsupported = {
        key: value
        for key, value in own.items()
        if key not in supported and key not in _IGNORED_CONFIG_FIELDS and key in base and value != base[key]
    }
    if unsupported:
        raise ValueError(
            f"the model's generation_config sets {unsupported}, which xpu_coopt's generate does not support; "
            "reset those fields on model.generation_config to their defaults to generate without them"
        )
    return {key: own[key] for key in supported if key in own and own[key] != base.get(key)}


def resolve_settings(model: Any, prompt_len: int, kwargs: dict[str, Any]) -> GenerationSettings:
    unknown = sorted(set(kwargs) - set(SUPPORTED_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"generate() got unsupported arguments {unknown}; xpu_coopt supports {', '.join(SUPPORTED_ARGUMENTS)}"
        )
    if kwargs.get("use_cache", True) is not True:
        raise ValueError("use_cache=False is not supported: xpu_coopt always decodes over its KV cache")
    # As transformers: the fields a generation_config passed to generate() sets override the model's, and
    # the other arguments override both.
    values = {
        **_config_defaults(model.generation_config),
        **_config_defaults(kwargs.get("generation_config")),
        **{key: value for key, value in kwargs.items() if key != "generation_config"},
    }
    max_new_tokens = values.get("max_new_tokens")
    if max_new_tokens is None:
        max_new_tokens = values.get("max_length", 20) - prompt_len
    eos = values.get("eos_token_id")
    if isinstance(eos, int):
        eos = [eos]
    settings = GenerationSettings(
        **{
            f.name: values[f.name]
            for f in fields(GenerationSettings)
            if f.name in values
            and values[f.name] is not None
            and f.name not in ("eos_token_id", "max_new_tokens")
        },
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos) if eos is not None else None,
    )
    if settings.pad_token_id is None and settings.eos_token_id:
        settings.pad_token_id = settings.eos_token_id[0]  # as transformers does, without its warning
    _validate(settings)
    return settings


def _validate(s: GenerationSettings) -> None:
    if s.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {s.max_new_tokens}")
    if s.min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {s.min_new_tokens}")
    if not isinstance(s.num_beams, int) or s.num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {s.num_beams}")
    if not isinstance(s.num_return_sequences, int) or s.num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {s.num_return_sequences!r}")
    if s.num_beams == 1 and not s.do_sample and s.num_return_sequences > 1:
        raise ValueError(
            f"num_return_sequences ({s.num_return_sequences}) > 1 needs sampling (do_sample=True) or beam "
            "search: greedy decoding returns one sequence per prompt (as transformers)"
        )
    if s.num_beams > 1 and s.num_return_sequences > s.num_beams:
        raise ValueError(
            f"num_return_sequences ({s.num_return_sequences}) must be between 1 and num_beams ({s.num_beams})"
        )
    if s.num_beams > 1 and s.do_sample:
        raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported")
    if s.do_sample and s.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {s.temperature}")
    if s.do_sample and not 0 < s.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.do_sample and s.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {s.top_k}")
    if s.do_sample and s.min_p is not None and not 0 <= s.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {s.min_p}")
    if not isinstance(s.no_repeat_ngram_size, int) or s.no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {s.no_repeat_ngram_size!r}")
    if not s.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    if s.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {s.early_stopping!r}")
    if s.pad_token_id is None and s.eos_token_id:
        raise ValueError("pad_token_id is needed to pad finished sequences")
    if s.stop_strings is not None and s.tokenizer is None:
        raise ValueError(
            "stop_strings needs the model's tokenizer: pass it as generate(..., tokenizer=tokenizer)"
        )
    if s.max_time is not None and not s.max_time > 0:
        raise ValueError(f"max_time must be > 0 seconds, got {s.max_time}")
    for name in ("logits_processor", "stopping_criteria"):
        for item in getattr(s, name):
            if not callable(item):
                raise ValueError(f"{name} must hold callables (input_ids, scores) -> ..., got {item!r}")
            argument = _BUILT_IN_PROCESSORS.get(type(item).__name__)
            if argument is not None:
                raise ValueError(
                    f"{name} holds a {type(item).__name__}: pass generate()'s {argument} argument instead, "
                    "which xpu_coopt applies where transformers does"
                )


# --- logits processors, in transformers' order: repetition_penalty, no_repeat_ngram_size, min_new_tokens, the
# caller's logits_processor; when sampling, then temperature, top_k, top_p, min_p


def _penalize_repetitions(
    scores: torch.Tensor, tokens: torch.Tensor, prompt_start: torch.Tensor, s: GenerationSettings
) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor. tokens [rows, length]: each row's prompt and what it
    generated so far; prompt_start [rows]: its first prompt column after the left padding. Every token id
    a row holds past its padding has its score divided by the penalty where positive and multiplied by
    it where negative, once however often it occurs."""
    if s.repetition_penalty == 1.0:
        return scores
    vocab = scores.shape[-1]
    columns = torch.arange(tokens.shape[1], device=tokens.device)
    # Padding, and ids the LM head cannot produce, all go to one extra column that is dropped after.
    tokens = tokens.clamp(max=vocab).masked_fill(columns < prompt_start[:, None], vocab)
    padded = F.pad(scores, (0, 1))
    seen = padded.gather(1, tokens)
    seen = torch.where(seen < 0, seen * s.repetition_penalty, seen / s.repetition_penalty)
    return padded.scatter(1, tokens, seen)[:, :vocab]


def _ban_repeated_ngrams(scores: torch.Tensor, tokens: torch.Tensor, s: GenerationSettings) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor, vectorised. tokens [rows, length]: each row's whole
    history, left padding included (as transformers counts it). A token that would complete an n-gram the
    row already holds gets -inf: every earlier n-gram whose first n - 1 tokens equal the row's last n - 1
    bans its last token."""
    n = s.no_repeat_ngram_size
    if n == 0 or tokens.shape[1] < n:
        return scores
    vocab = scores.shape[-1]
    ngrams = tokens.unfold(1, n, 1)  # [rows, length - n + 1, n]
    repeats = (ngrams[:, :, : n - 1] == tokens[:, None, tokens.shape[1] - n + 1 :]).all(dim=-1)
    # Ids that complete no repeat, and ids the LM head cannot produce, go to one extra column, dropped after.
    banned = ngrams[:, :, n - 1].clamp(max=vocab).masked_fill(~repeats, vocab)
    return F.pad(scores, (0, 1)).scatter(1, banned, float("-inf"))[:, :vocab]


def _suppress_eos(
    scores: torch.Tensor, s: GenerationSettings, eos: torch.Tensor, new_tokens: int
) -> torch.Tensor:
    """eos: the EOS ids on the scores' device (indexing with a Python list would copy it there, a wait)."""
    if eos.numel() and new_tokens < s.min_new_tokens:
        scores = scores.index_fill(-1, eos, float("-inf"))
    return scores


def _run_callers_processors(
    scores: torch.Tensor, tokens: torch.Tensor, s: GenerationSettings
) -> torch.Tensor:
    """The caller's logits_processor, each given the rows' tokens so far (prompt and padding included) and
    the scores as processed up to it, as transformers calls them."""
    for processor in s.logits_processor:
        scores = processor(tokens, scores)
    return scores


def _stopping_criteria(s: GenerationSettings) -> list[Any]:
    """transformers' criteria for max_time and stop_strings (made per generation: max_time's clock starts
    here), then the caller's, in transformers' order; EOS and the length limit are the loops' own."""
    criteria: list[Any] = []
    if s.max_time is not None or s.stop_strings is not None:
        from transformers import MaxTimeCriteria, StopStringCriteria

        if s.max_time is not None:
            criteria.append(MaxTimeCriteria(max_time=s.max_time))
        if s.stop_strings is not None:
            criteria.append(StopStringCriteria(tokenizer=s.tokenizer, stop_strings=s.stop_strings))
    return criteria + list(s.stopping_criteria)


def _criteria_met(
    criteria: list[Any], tokens: torch.Tensor, scores: list[torch.Tensor] | None
) -> torch.Tensor:
    """bool [rows]: rows some criterion ends (tokens: each row's whole sequence, its newest token included;
    scores: the processed scores so far, as transformers passes them with output_scores, else None)."""
    met = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for criterion in criteria:
        met |= criterion(tokens, None if scores is None else tuple(scores)).to(
            device=met.device, dtype=torch.bool
        )
    return met


def _process(
    scores: torch.Tensor,
    tokens: torch.Tensor,
    prompt_start: torch.Tensor,
    eos: torch.Tensor,
    step: int,
    s: GenerationSettings,
) -> torch.Tensor:
    """The processors before the sampling warpers, in transformers' order, on float32 scores; tokens: each
    row's sequence so far, step: tokens generated so far."""
    scores = _penalize_repetitions(scores, tokens, prompt_start, s)
    scores = _ban_repeated_ngrams(scores, tokens, s)
    scores = _suppress_eos(scores, s, eos, step)
    return _run_callers_processors(scores, tokens, s)


def _warp(scores: torch.Tensor, s: GenerationSettings) -> torch.Tensor:
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        k = min(s.top_k, scores.shape[-1])
        threshold = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if s.top_p < 1.0:
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - s.top_p)
        remove[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))
    if s.min_p is not None:
        # Without beam sampling one token is kept at least, and the most likely one always passes.
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < s.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return scores


def generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, prompt_length]")
    input_ids = input_ids.to(model.device)
    settings = resolve_settings(model, input_ids.shape[1], kwargs)
    streamer = kwargs.get("streamer")
    generator = kwargs.get("generator")
    if streamer is not None and (
        settings.num_beams > 1 or input_ids.shape[0] * settings.num_return_sequences > 1
    ):
        raise ValueError("streamer supports one sequence: batch size 1 without beam search (as transformers)")
    with torch.inference_mode():
        if settings.num_beams > 1:
            output = _beam_search(model, input_ids, attention_mask, settings)
        else:
            output = _sample(model, input_ids, attention_mask, settings, streamer, generator)
    return output if settings.return_dict_in_generate else output.sequences


def _eos_ids(s: GenerationSettings, device: torch.device) -> torch.Tensor:
    """The EOS ids as a device tensor, made once per generation: per-step host-to-device copies would each
    wait for the work queued before them, a decode step included."""
    return torch.tensor(s.eos_token_id or [], dtype=torch.long, device=device)


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


def _sample(model, input_ids, attention_mask, s: GenerationSettings, streamer, generator) -> GenerateOutput:
    """Greedy or sampling; sampling num_return_sequences > 1 sequences of each prompt draws them side by
    side, as transformers does (row order: each prompt's samples together), over one prefill of the prompt
    whose K/V all its samples share (the segment cache's beams, never reordered)."""
    samples = s.num_return_sequences
    criteria = _stopping_criteria(s)  # before the prefill: max_time counts it, as in transformers
    logits, cache = model.prefill(input_ids, attention_mask, samples, s.max_new_tokens, reuse_kept_cache=True)
    prompt_start = cache.prompt_start  # each prompt's first column after its left padding
    if samples > 1:
        logits = logits.repeat_interleave(samples, dim=0)
        input_ids = input_ids.repeat_interleave(samples, dim=0)
        prompt_start = prompt_start.repeat_interleave(samples)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    batch, prompt_len = input_ids.shape
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    eos = _eos_ids(s, input_ids.device)
    sequences = torch.empty((batch, prompt_len + s.max_new_tokens), dtype=torch.long, device=input_ids.device)
    sequences[:, :prompt_len] = input_ids
    all_scores: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []
    step_times: list[float] = []
    for step in range(s.max_new_tokens):
        length = prompt_len + step
        if s.output_logits:  # a copy: the decode graph's output buffer is overwritten by the next step
            all_logits.append(logits.to(torch.float32, copy=True))
        scores = _process(logits.float(), sequences[:, :length], prompt_start, eos, step, s)
        if s.do_sample:
            scores = _warp(scores, s)
            next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        if s.output_scores:
            # Unprocessed float32 scores are the decode graph's output buffer, which the next step overwrites.
            all_scores.append(scores.clone() if scores is logits else scores)
        if eos.numel():  # as transformers: finished rows are padded only where EOS can finish them
            next_tokens = torch.where(unfinished, next_tokens, s.pad_token_id)
        sequences[:, length] = next_tokens
        step_times.append(time.perf_counter())
        unfinished &= ~torch.isin(next_tokens, eos)
        if criteria:
            scores_so_far = all_scores if s.output_scores else None
            unfinished &= ~_criteria_met(criteria, sequences[:, : length + 1], scores_so_far)
        any_unfinished = _HostFlags(unfinished.any().view(1))
        last = step == s.max_new_tokens - 1
        # The next step is queued before anything waits for the device (the streamer, the stop check), so
        # the GPU never idles while the host decides; after the last EOS that one step is discarded.
        if not last:
            next_logits = model.decode(next_tokens, cache)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if last or not any_unfinished.read()[0]:
            break
        logits = next_logits
    if streamer is not None:
        streamer.end()
    model.keep_cache(cache)
    sequences = sequences[:, : prompt_len + len(step_times)]
    scores = tuple(all_scores) if s.output_scores else None
    logits = tuple(all_logits) if s.output_logits else None
    return GenerateOutput(sequences, None, scores, cache.nbytes(), step_times, logits)


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor [R, K, ...], indices [R, J] -> [R, J, ...]."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def _beam_search(model, input_ids, attention_mask, s: GenerationSettings) -> GenerateOutput:
    """transformers 5's vectorised beam search, with the prompt prefilled once per request."""
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    beams = s.num_beams
    max_length = prompt_len + s.max_new_tokens
    eos = _eos_ids(s, device)
    beams_to_keep = max(2, 1 + eos.numel()) * beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < beams
    fill = (s.pad_token_id or s.eos_token_id[0]) if s.eos_token_id else -1

    running_sequences = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
    running_sequences[:, :, :prompt_len] = input_ids[:, None, :]
    sequences = running_sequences.clone()
    running_scores = torch.zeros((batch, beams), dtype=torch.float, device=device)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, beams), -1e9, dtype=torch.float, device=device)
    is_finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_beam_indices = torch.full((batch, beams, s.max_new_tokens), -1, dtype=torch.int32, device=device)
    beam_indices = running_beam_indices.clone()
    batch_offset = torch.arange(batch, device=device).view(-1, 1) * beams
    all_scores: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []
    step_times: list[float] = []
    criteria = _stopping_criteria(s)  # before the prefill: max_time counts it, as in transformers

    logits, cache = model.prefill(input_ids, attention_mask, beams, s.max_new_tokens, reuse_kept_cache=True)
    logits = logits.repeat_interleave(beams, dim=0)  # every beam of a request starts from the same prompt
    prompt_start = cache.prompt_start.repeat_interleave(beams)  # each row's first column after its padding
    cur_len = prompt_len
    while True:
        if s.output_logits:
            all_logits.append(logits.to(torch.float32, copy=True))
        history = running_sequences[:, :, :cur_len].reshape(batch * beams, cur_len)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = _process(log_probs, history, prompt_start, eos, cur_len - prompt_len, s)
        if s.output_scores:
            all_scores.append(log_probs)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.view(batch, beams, vocab) + running_scores[:, :, None]
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
            met = _criteria_met(criteria, candidates, all_scores if s.output_scores else None)
            hits_stop |= met.view(batch, beams_to_keep)

        # Running beams for the next step: the best candidates that did not stop.
        running_candidates = topk_log_probs + hits_stop.float() * -1.0e9
        next_indices = torch.topk(running_candidates, k=beams)[1]
        running_sequences = _gather_beams(topk_sequences, next_indices)
        running_scores = _gather_beams(running_candidates, next_indices)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_indices)

        # Finished hypotheses: candidates among the top num_beams that stopped, scored with the length penalty.
        just_finished = hits_stop & top_num_beam_mask[None, :]
        finished_scores = topk_log_probs / ((cur_len + 1 - prompt_len) ** s.length_penalty)
        batch_full = is_finished.all(dim=-1, keepdim=True) & (s.early_stopping is True)
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
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_length**s.length_penalty)
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
        open_beams = not (all_finished and s.early_stopping is True)
        if last or not (any_improvable and open_beams and not all_stopped):
            break
        logits = next_logits

    model.keep_cache(cache)
    keep = s.num_return_sequences
    sequences = sequences[:, :keep].reshape(batch * keep, -1)
    scores = beam_scores[:, :keep].reshape(-1)
    generated_lengths = (beam_indices[:, :keep].reshape(batch * keep, -1) + 1).bool().sum(dim=1)
    sequences = sequences[:, : prompt_len + int(generated_lengths.max())]
    return GenerateOutput(
        sequences,
        scores if s.output_scores else None,
        tuple(all_scores) if s.output_scores else None,
        cache.nbytes(),
        step_times,
        tuple(all_logits) if s.output_logits else None,
    )
