"""generate()'s arguments: which it takes, how the model's generation_config fills them (as transformers
fills them), and their validation, into one GenerationSettings."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

SUPPORTED_ARGUMENTS = (
    # lengths and search
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "num_beams", "length_penalty",
    "early_stopping", "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id",
    "prompt_lookup_num_tokens", "max_matching_ngram_size",
    # sampling
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "generator",
    # processors and stopping
    "repetition_penalty", "no_repeat_ngram_size", "sequence_bias", "bad_words_ids", "prefix_allowed_tokens_fn",
    "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "renormalize_logits", "logits_processor",
    "stopping_criteria", "stop_strings", "max_time", "tokenizer",
    # output and the rest
    "streamer", "return_dict_in_generate", "output_scores", "output_logits", "use_cache", "generation_config",
)  # fmt: skip

# transformers' processors and criteria that generate() arguments build: the argument to pass instead.
_BUILT_IN_PROCESSORS = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "MinLengthLogitsProcessor": "min_length",
    "TemperatureLogitsWarper": "temperature",
    "TopKLogitsWarper": "top_k",
    "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
    "EosTokenCriteria": "eos_token_id",
    "MaxLengthCriteria": "max_new_tokens",
    "MaxTimeCriteria": "max_time",
    "StopStringCriteria": "stop_strings",
}

# Fields of a model's generation_config that xpu_coopt neither uses nor needs to: bookkeeping only.
_IGNORED_CONFIG_FIELDS = {
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash", "use_cache",
    "cache_implementation", "cache_config", "return_legacy_cache", "output_attentions",
    "output_hidden_states", "decoder_start_token_id", "generation_kwargs",
    "is_assistant", "compile_config", "disable_compile", "trust_remote_code",
}  # fmt: skip


# Arguments that take one integer (numpy's included, as transformers takes them) or one real number.
INTEGER_ARGUMENTS = (
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "num_beams", "num_return_sequences",
    "top_k", "no_repeat_ngram_size", "prompt_lookup_num_tokens", "max_matching_ngram_size", "pad_token_id",
    "bos_token_id",
)  # fmt: skip
REAL_ARGUMENTS = (
    "temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "length_penalty", "max_time",
)  # fmt: skip

# transformers' generate() without max_new_tokens or max_length: 20 new tokens.
DEFAULT_NEW_TOKENS = 20


@dataclass
class GenerationSettings:
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    min_new_tokens: int = 0
    min_length: int = 0  # prompt (padding included) plus generated tokens before EOS may come
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0  # 1: off
    epsilon_cutoff: float = 0.0  # 0: off
    eta_cutoff: float = 0.0  # 0: off
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    # prompt lookup decoding (xpu_coopt/generation/prompt_lookup.py): drafts per step, and the longest n-gram matched
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int = 2
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # token-id arguments (xpu_coopt/generation/token_rules.py), as transformers' processors of the same names
    sequence_bias: dict[tuple[int, ...], float] | None = None  # also given as [[ids, bias], ...]
    bad_words_ids: list[list[int]] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: list[int] | None = None  # also given as one int
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start after the prompt, factor)
    remove_invalid_values: bool = False
    renormalize_logits: bool = False
    # callable (batch index, the row's tokens [length]) -> the token ids the row may take next
    prefix_allowed_tokens_fn: Any = None
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


def _config_defaults(generation_config: Any, source: str) -> dict[str, Any]:
    """The supported fields a generation_config sets away from their defaults; ValueError for unsupported
    ones set so. source: where the config comes from, as the error names it."""
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
            f"{source} sets {unsupported}, which xpu_coopt's generate does not support; reset those fields to "
            "their defaults to generate without them"
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
        **_config_defaults(model.generation_config, "the model's generation_config"),
        **_config_defaults(kwargs.get("generation_config"), "the generation_config passed to generate()"),
        **{key: value for key, value in kwargs.items() if key != "generation_config"},
    }
    _normalize_numbers(values)
    max_new_tokens = values.get("max_new_tokens")
    if max_new_tokens is None:
        max_new_tokens = _new_tokens_within_max_length(
            values.get("max_length"), prompt_len, model.spec.max_position_embeddings
        )
    for name in ("eos_token_id", "forced_eos_token_id"):  # one id or several, as transformers takes them
        if isinstance(values.get(name), int):
            values[name] = [values[name]]
        elif values.get(name) is not None:
            values[name] = list(values[name])
    if isinstance(values.get("sequence_bias"), list):  # transformers' list form: [[ids, bias], ...]
        values["sequence_bias"] = _sequence_bias_from_list(values["sequence_bias"])
    settings = GenerationSettings(
        **{
            f.name: values[f.name]
            for f in fields(GenerationSettings)
            if f.name in values and values[f.name] is not None and f.name != "max_new_tokens"
        },
        max_new_tokens=max_new_tokens,
    )
    if settings.pad_token_id is None and settings.eos_token_id:
        settings.pad_token_id = settings.eos_token_id[0]  # as transformers does, without its warning
    _validate(settings)
    return settings


def _normalize_numbers(values: dict[str, Any]) -> None:
    """Integer arguments as Python ints and real ones as floats, numpy's scalars included; ValueError
    naming the argument for anything else, a fraction where an integer goes and NaN included."""
    for name in INTEGER_ARGUMENTS:
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        values[name] = int(value)
    for name in REAL_ARGUMENTS:
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        values[name] = float(value)


def _new_tokens_within_max_length(max_length: int | None, prompt_len: int, position_limit: int) -> int:
    """max_new_tokens where none is set: max_length counts the prompt (left padding included); where no
    max_length is set either, 20 new tokens with the total capped at max_position_embeddings, as
    transformers' default."""
    if max_length is None:
        max_length = min(prompt_len + DEFAULT_NEW_TOKENS, position_limit)
        source = f"the default ({DEFAULT_NEW_TOKENS} new tokens, at most max_position_embeddings in all)"
    else:
        source = "max_length"
    if max_length <= prompt_len:
        raise ValueError(
            f"input_ids hold {prompt_len} tokens (left padding included), and {source} allows {max_length} in "
            "all: no room for a new token; set max_new_tokens instead"
        )
    return max_length - prompt_len


def _sequence_bias_from_list(pairs: list[Any]) -> dict[tuple[int, ...], float]:
    if not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], list) for pair in pairs
    ):
        raise ValueError(
            f"sequence_bias must be a dict {{(ids, ...): bias}} or a list of [ids, bias], got {pairs!r}"
        )
    return {tuple(ids): bias for ids, bias in pairs}


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _validate_token_arguments(settings: GenerationSettings) -> None:
    """The token-id arguments' shapes; their ids against the vocabulary are token_rules.TokenRules's."""
    if settings.sequence_bias is not None:
        bias = settings.sequence_bias
        if not isinstance(bias, dict) or not bias or not all(
            isinstance(ids, tuple) and ids and all(map(_is_token_id, ids))
            and isinstance(value, (int, float)) and not isinstance(value, bool)
            for ids, value in bias.items()
        ):  # fmt: skip
            raise ValueError(
                "sequence_bias must map non-empty tuples of token ids (integers >= 0) to float biases, got "
                f"{bias!r}"
            )
    if settings.bad_words_ids is not None and (
        not isinstance(settings.bad_words_ids, list)
        or not settings.bad_words_ids
        or not all(
            isinstance(words, list) and words and all(map(_is_token_id, words))
            for words in settings.bad_words_ids
        )
    ):
        raise ValueError(
            f"bad_words_ids must be a non-empty list of non-empty lists of token ids (integers >= 0), got "
            f"{settings.bad_words_ids!r}"
        )
    for name in ("suppress_tokens", "begin_suppress_tokens", "forced_eos_token_id"):
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, (list, tuple)) or not all(map(_is_token_id, value))):
            raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {value!r}")
    if settings.prefix_allowed_tokens_fn is not None and not callable(settings.prefix_allowed_tokens_fn):
        raise ValueError(
            "prefix_allowed_tokens_fn must be a callable (batch_id, input_ids) -> allowed token ids, got "
            f"{settings.prefix_allowed_tokens_fn!r}"
        )
    if settings.forced_bos_token_id is not None and not _is_token_id(settings.forced_bos_token_id):
        raise ValueError(
            f"forced_bos_token_id must be a token id (an integer >= 0), got {settings.forced_bos_token_id!r}"
        )
    decay = settings.exponential_decay_length_penalty
    if decay is not None:
        if not (
            isinstance(decay, (list, tuple)) and len(decay) == 2 and _is_token_id(decay[0])
            and isinstance(decay[1], (int, float)) and not isinstance(decay[1], bool)
        ):  # fmt: skip
            raise ValueError(
                "exponential_decay_length_penalty must be (start_index, decay_factor): an integer >= 0 and a "
                f"float, got {decay!r}"
            )
        if not settings.eos_token_id:
            raise ValueError("exponential_decay_length_penalty raises the EOS scores: it needs eos_token_id")


def _validate(settings: GenerationSettings) -> None:
    _validate_search(settings)
    _validate_sampling(settings)
    if not isinstance(settings.no_repeat_ngram_size, int) or settings.no_repeat_ngram_size < 0:
        raise ValueError(
            f"no_repeat_ngram_size must be an integer >= 0, got {settings.no_repeat_ngram_size!r}"
        )
    if not settings.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {settings.repetition_penalty}")
    if settings.stop_strings is not None and settings.tokenizer is None:
        raise ValueError(
            "stop_strings needs the model's tokenizer: pass it as generate(..., tokenizer=tokenizer)"
        )
    _validate_token_arguments(settings)
    _validate_prompt_lookup(settings)
    if settings.max_time is not None and not settings.max_time > 0:
        raise ValueError(f"max_time must be > 0 seconds, got {settings.max_time}")
    _validate_callers_objects(settings)


def _validate_search(settings: GenerationSettings) -> None:
    """Lengths, beams and the sequences returned."""
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {settings.max_new_tokens}")
    if settings.min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {settings.min_new_tokens}")
    if not isinstance(settings.min_length, int) or settings.min_length < 0:
        raise ValueError(f"min_length must be an integer >= 0, got {settings.min_length!r}")
    if not isinstance(settings.num_beams, int) or settings.num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {settings.num_beams}")
    if not isinstance(settings.num_return_sequences, int) or settings.num_return_sequences < 1:
        raise ValueError(
            f"num_return_sequences must be an integer >= 1, got {settings.num_return_sequences!r}"
        )
    if settings.num_beams == 1 and not settings.do_sample and settings.num_return_sequences > 1:
        raise ValueError(
            f"num_return_sequences ({settings.num_return_sequences}) > 1 needs sampling (do_sample=True) or beam "
            "search: greedy decoding returns one sequence per prompt (as transformers)"
        )
    if settings.num_beams > 1 and settings.num_return_sequences > settings.num_beams:
        raise ValueError(
            f"num_return_sequences ({settings.num_return_sequences}) must be between 1 and num_beams ({settings.num_beams})"
        )
    if settings.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {settings.early_stopping!r}")


def _validate_sampling(settings: GenerationSettings) -> None:
    """The warpers' settings, where they apply (do_sample)."""
    if settings.do_sample and settings.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {settings.temperature}")
    if settings.do_sample and not 0 < settings.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {settings.top_p}")
    if settings.do_sample and settings.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {settings.top_k}")
    if settings.do_sample and settings.min_p is not None and not 0 <= settings.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {settings.min_p}")
    if settings.do_sample and not 0 < settings.typical_p <= 1:
        raise ValueError(f"typical_p must be in (0, 1], got {settings.typical_p}")
    for name in ("epsilon_cutoff", "eta_cutoff"):
        if settings.do_sample and not 0 <= getattr(settings, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(settings, name)}")


def _validate_callers_objects(settings: GenerationSettings) -> None:
    """The caller's processors and criteria: callables, and none that an argument of generate() builds."""
    for name in ("logits_processor", "stopping_criteria"):
        for item in getattr(settings, name):
            if not callable(item):
                raise ValueError(f"{name} must hold callables (input_ids, scores) -> ..., got {item!r}")
            argument = _BUILT_IN_PROCESSORS.get(type(item).__name__)
            if argument is not None:
                raise ValueError(
                    f"{name} holds a {type(item).__name__}: pass generate()'s {argument} argument instead, "
                    "which xpu_coopt applies where transformers does"
                )


def _validate_prompt_lookup(settings: GenerationSettings) -> None:
    """prompt_lookup_num_tokens runs one sequence (as transformers' assisted decoding): no beams, no
    several return sequences."""
    for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
        value = getattr(settings, name)
        if value is not None and (not _is_token_id(value) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if settings.prompt_lookup_num_tokens is not None and (
        settings.num_beams > 1 or settings.num_return_sequences > 1
    ):
        raise ValueError(
            "prompt_lookup_num_tokens generates one sequence: it takes num_beams=1 and num_return_sequences=1, "
            f"got num_beams={settings.num_beams}, num_return_sequences={settings.num_return_sequences}"
        )
