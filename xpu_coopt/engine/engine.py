"""The continuous-batching loop over one optimized model and one KV pool: each step schedules sequences
(scheduler.py), runs one forward over their ragged batch (step_batch.py), samples each sequence whose
prompt is done (sampling.py), and retires the finished ones, whose blocks go back to the pool."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from xpu_coopt.cache.storage import KVFormat
from xpu_coopt.cache.window import window_arguments
from xpu_coopt.engine.block_manager import BlockManager
from xpu_coopt.engine.kv_pool import allocate_pool
from xpu_coopt.engine.request import SamplingParams, Sequence, Status, TokenLogprobs
from xpu_coopt.engine.sampling import next_tokens, token_logprobs
from xpu_coopt.engine.scheduler import Scheduler, check_fits
from xpu_coopt.engine.step_batch import StepBatch
from xpu_coopt.memory import free_memory
from xpu_coopt.model.optimized import OptimizedModel
from xpu_coopt.ops import fp8

DEFAULT_BLOCK_SIZE = 16
DEFAULT_KV_CACHE_MEMORY = 1 << 30  # bytes of K/V the pool holds unless told


@dataclass(frozen=True)
class Finished:
    """A request's result."""

    request_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None  # one per output token, where the request asked


@dataclass(frozen=True)
class EngineLimits:
    """What an engine can take: a server checks requests against these without touching the engine."""

    vocab_size: int
    num_blocks: int
    block_size: int
    max_context: int  # the model's positions

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError if the request could never run: no prompt, unknown tokens, or more than the pool holds."""
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        check_fits(len(prompt_ids), params.max_tokens, self.num_blocks, self.block_size)

    @property
    def room(self) -> int:
        """Tokens one request may hold: the context, or the whole pool where it is smaller."""
        return min(self.max_context, self.num_blocks * self.block_size)


@dataclass(frozen=True)
class TokenEvent:
    """A token a step sampled for a request; `finished` is set on the request's last."""

    request_id: int
    token: int
    finished: Finished | None = None
    logprobs: TokenLogprobs | None = None  # where the request asked


class Engine:
    def __init__(
        self,
        model: OptimizedModel,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_batched_tokens: int = 256,
        max_num_seqs: int = 64,
    ) -> None:
        if model.static_scales is not None:
            raise ValueError(
                "the engine runs dynamic FP8 scales or a 16-bit cache; static KV scales are not supported yet"
            )
        self.model = model
        spec = model.spec
        self.blocks = BlockManager(num_blocks, block_size)
        self.limits = EngineLimits(spec.vocab_size, num_blocks, block_size, spec.max_position_embeddings)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens, max_num_seqs)
        kv = KVFormat(
            spec.num_layers, spec.num_kv_heads, spec.head_dim, model.kv_dtype, model.dtype, model.device
        )
        self.pool = allocate_pool(kv, num_blocks, block_size)  # [blocks, Hkv, block_size, D] per layer, once
        self.windows = window_arguments(spec.layer_windows)
        self._ids = itertools.count()
        eos = getattr(model.generation_config, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else eos or [])

    @staticmethod
    def pool_bytes(
        model: OptimizedModel, kv_cache_memory: int | None = None, kv_cache_fraction: float | None = None
    ) -> int:
        """The KV pool's budget: kv_cache_memory bytes, or kv_cache_fraction of the memory the model's device
        has free now (vLLM's gpu_memory_utilization, of what the loaded model left); 1 GiB given neither."""
        if kv_cache_memory is not None and kv_cache_fraction is not None:
            raise ValueError(
                "give the KV pool's size as kv_cache_memory (bytes) or kv_cache_fraction, not both"
            )
        if kv_cache_fraction is None:
            return DEFAULT_KV_CACHE_MEMORY if kv_cache_memory is None else kv_cache_memory
        if not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must lie in (0, 1], not {kv_cache_fraction}")
        return int(kv_cache_fraction * free_memory(model.device))

    @staticmethod
    def blocks_for_memory(
        model: OptimizedModel, kv_cache_memory: int, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> int:
        """How many blocks a budget of kv_cache_memory bytes holds (K and V of every layer, FP8 scales included)."""
        spec = model.spec
        fp8_pool = fp8.is_fp8(model.kv_dtype)
        per_token = spec.kv_bytes_per_token(1 if fp8_pool else model.dtype.itemsize)
        if fp8_pool:  # a scale per token and KV head
            per_token += spec.kv_bytes_per_token(fp8.SCALE_DTYPE.itemsize) // spec.head_dim
        return kv_cache_memory // (per_token * block_size)

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: int | None = None
    ) -> int:
        """Queues a request (under the id given, else a new one); returns its id. ValueError as EngineLimits.check."""
        self.limits.check(prompt_ids, params)
        if request_id is None:
            request_id = next(self._ids)
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.model.device)
            parallel = self.model.decoder.parallel
            if params.seed is not None:
                generator.manual_seed(params.seed)
            elif parallel is not None:  # every rank adds the same requests: rank 0's seed keeps them in step
                generator.manual_seed(parallel.broadcast_seed())
            else:  # from the system's entropy, leaving torch's global generator untouched
                generator.seed()
        self.scheduler.add(Sequence(request_id, list(prompt_ids), params, stop, generator=generator))
        return request_id

    def abort(self, request_id: int) -> None:
        """Drops a request wherever it is; its blocks go back to the pool at once."""
        for sequence in [*self.scheduler.running, *self.scheduler.waiting]:
            if sequence.id == request_id:
                sequence.finish("abort")
                self.scheduler.retire(sequence)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[TokenEvent]:
        """Runs one step; returns the tokens it sampled, in the order of the step's sequences."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        batch = StepBatch(
            scheduled, self.blocks.tables, self.pool, self.blocks.block_size, self.model.kv_dtype, self.windows,
            self.model.spec.attention_scale,
        )  # fmt: skip
        decoder = self.model.decoder
        decoder.cover_positions(int(batch.positions.max()) + 1)
        sampled = [
            i
            for i, item in enumerate(scheduled)
            if item.sequence.computed + item.tokens == item.sequence.length
        ]
        with torch.inference_mode():
            logits = decoder.forward(batch.input_ids, batch.positions, batch, False, batch.last_rows[sampled])
        for item in scheduled:
            item.sequence.computed += item.tokens
            self.blocks.name_full_blocks(item.sequence.id, item.sequence.token_ids, item.sequence.computed)
        sequences = [scheduled[i].sequence for i in sampled]
        tokens = next_tokens(logits, sequences)
        events = []
        for sequence, token, logprobs in zip(
            sequences, tokens, token_logprobs(logits, sequences, tokens), strict=True
        ):
            sequence.append(token)
            if logprobs is not None:
                sequence.logprobs.append(logprobs)
            finished = None
            if sequence.status is Status.FINISHED:
                self.scheduler.retire(sequence)
                finished = Finished(sequence.id, sequence.prompt_ids, sequence.output_ids, sequence.finish_reason,
                                    sequence.logprobs if sequence.params.logprobs is not None else None)  # fmt: skip
            events.append(TokenEvent(sequence.id, token, finished, logprobs))
        return events

    def run(self, requests: Iterable[tuple[list[int], SamplingParams]]) -> list[Finished]:
        """Adds the requests and steps until all are done; results in the order given."""
        ids = [self.add_request(prompt, params) for prompt, params in requests]
        done: dict[int, Finished] = {}
        while self.has_work:
            done.update((event.request_id, event.finished) for event in self.step() if event.finished)
        return [done[i] for i in ids]
