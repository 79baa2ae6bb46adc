"""generate(): greedy, sampling, beam search and prompt lookup over the segment KV cache, with
transformers' argument names.

xpu_coopt owns this loop (rather than riding on transformers' generate) because transformers expands the
prompt to every beam before prefill and copies the whole cache at each beam step; here the prompt is
prefilled once per request and a beam step reorders integers. The arithmetic of each decision (logits
processors, beam bookkeeping, length penalty, early stopping) follows transformers 5 so that outputs match.

    settings.py             generate()'s arguments, the generation_config merge, validation
    sampling.py             greedy decoding and sampling
    beam_search.py          beam search and beam sampling
    prompt_lookup.py        prompt lookup decoding
    logits_processing.py    logits processors, warpers and stopping criteria, in transformers' order
    token_rules.py          the arguments that name token ids
    session.py              a generation's cache and decode graph (CacheSession), kept for the next
    request.py              one generate() call's inputs, and how the loops begin and end
    output.py               GenerateOutput and what the loops record
    transformers_release.py where transformers releases differ
"""

from __future__ import annotations

from typing import Any

import torch

from xpu_coopt.cache.prefix_cache import PrefixCache
from xpu_coopt.generation.beam_search import beam_search
from xpu_coopt.generation.output import GenerateOutput
from xpu_coopt.generation.prompt_lookup import prompt_lookup
from xpu_coopt.generation.request import GenerationRequest
from xpu_coopt.generation.sampling import sample
from xpu_coopt.generation.settings import resolve_settings

__all__ = ["GenerateOutput", "generate"]


def generate(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
) -> GenerateOutput | torch.Tensor:
    """An OptimizedModel's generate(): the sequences, or with return_dict_in_generate a GenerateOutput."""
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
    request = GenerationRequest(model, input_ids, attention_mask, settings, streamer, generator, prefix_cache)
    with torch.inference_mode():
        if settings.num_beams > 1:
            output = beam_search(request)
        elif settings.prompt_lookup_num_tokens is not None:
            output = prompt_lookup(request)
        else:
            output = sample(request)
    output = output.ordinary()
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
