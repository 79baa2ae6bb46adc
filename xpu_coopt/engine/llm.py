"""LLM: the offline API for scripts, as vLLM's: many prompts through the continuous-batching engine,
results in prompt order.

    llm = xpu_coopt.LLM("model.gguf")
    for out in llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32)):
        print(out.text)
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Any

from xpu_coopt.engine.engine import DEFAULT_BLOCK_SIZE, Engine
from xpu_coopt.engine.request import SamplingParams, TokenLogprobs
from xpu_coopt.model.optimized import OptimizedModel


@dataclass(frozen=True)
class RequestOutput:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None  # None without a tokenizer
    finish_reason: str  # "stop" (a stop or EOS token) or "length" (max_tokens)
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids, with SamplingParams(logprobs=k)


class LLM:
    """model: a path (.gguf file or Hugging Face folder, loaded by xpu_coopt.from_pretrained), a transformers
    model (optimize()d here) or an optimized model. kv_cache_memory: bytes of the KV pool, preallocated
    once (or kv_cache_fraction of the memory the device has free once the model is loaded, or num_blocks
    blocks of block_size tokens). max_num_batched_tokens: tokens a step computes at
    most (a long prompt is prefilled in chunks of it beside the running decodes); max_num_seqs: sequences
    a step runs at most. optimize_kwargs go to optimize() or from_pretrained()."""

    def __init__(
        self,
        model: str | PathLike | Any,
        tokenizer: Any = None,
        kv_cache_memory: int | None = None,
        num_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_batched_tokens: int = 256,
        max_num_seqs: int = 64,
        kv_cache_fraction: float | None = None,
        **optimize_kwargs: Any,
    ) -> None:
        self.model, self.tokenizer = _optimized(model, tokenizer, optimize_kwargs)
        if num_blocks is None:
            budget = Engine.pool_bytes(self.model, kv_cache_memory, kv_cache_fraction)
            num_blocks = Engine.blocks_for_memory(self.model, budget, block_size)
        self.engine = Engine(self.model, num_blocks, block_size, max_num_batched_tokens, max_num_seqs)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        progress: bool = True,
    ) -> list[RequestOutput]:
        """Each prompt (text, or token ids) continued; outputs in the prompts' order."""
        from tqdm.auto import tqdm

        params = params or SamplingParams()
        token_lists = [
            self._token_ids(prompt) for prompt in ([prompts] if isinstance(prompts, str) else prompts)
        ]
        ids = [self.engine.add_request(tokens, params) for tokens in token_lists]
        done = {}
        with tqdm(total=len(ids), desc="generating", unit="request", disable=not progress) as bar:
            while self.engine.has_work:
                for event in self.engine.step():
                    if event.finished is not None:
                        done[event.request_id] = event.finished
                        bar.update()
        return [self._output(done[i]) for i in ids]

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass tokenizer=, or token ids")
            return self.tokenizer(prompt)["input_ids"]
        return list(prompt)

    def _output(self, result: Any) -> RequestOutput:
        text = (
            None
            if self.tokenizer is None
            else self.tokenizer.decode(result.output_ids, skip_special_tokens=True)
        )
        return RequestOutput(
            result.prompt_ids, result.output_ids, text, result.finish_reason, result.logprobs
        )


def _optimized(model: Any, tokenizer: Any, optimize_kwargs: dict[str, Any]) -> tuple[OptimizedModel, Any]:
    import torch

    import xpu_coopt

    if isinstance(model, OptimizedModel):
        return model, tokenizer
    if isinstance(model, torch.nn.Module):
        return xpu_coopt.optimize(model, **optimize_kwargs), tokenizer
    loaded, own = xpu_coopt.from_pretrained(model, **optimize_kwargs)
    return loaded, tokenizer or own
