"""Side-by-side benchmark: transformers' generate and xpu_coopt's, in one process, on the same inputs.

Both runs generate exactly `output_tokens` tokens (min_new_tokens = max_new_tokens, so EOS never stops
them early). Per-step timestamps come from a logits processor on the transformers side (called once per
step, right after the forward pass) and from xpu_coopt's own step_times; the first token's latency
includes the prefill, the next-token latencies are the gaps between consecutive steps.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

import xpu_coopt
from xpu_coopt.model.optimized import held_bytes


@dataclass
class RunResult:
    first_token_ms: float
    next_token_ms_mean: float
    next_token_ms_p90: float
    throughput_tokens_per_s: float
    kv_cache_bytes: int
    largest_kv_allocation: int = 0  # bytes of the KV cache's largest single tensor
    weight_bytes: int = 0  # weights held by the model that ran (xpu_coopt: the shared ones included)
    decode_graph_captures: int = 0  # xpu_coopt's CUDA graph captures in this run (GenerateOutput's)


@dataclass
class BenchResult:
    transformers: RunResult  # the best of the repeats
    xpu_coopt: RunResult
    settings: dict[str, Any]
    runs: dict[str, list[RunResult]] = field(default_factory=dict)  # every timed repeat, in order, by side

    @property
    def ratios(self) -> dict[str, float]:
        base, ours = self.transformers, self.xpu_coopt
        return {
            "first_token_speedup": base.first_token_ms / ours.first_token_ms,
            "next_token_speedup": base.next_token_ms_mean / ours.next_token_ms_mean,
            "throughput_ratio": ours.throughput_tokens_per_s / base.throughput_tokens_per_s,
            "kv_bytes_ratio": ours.kv_cache_bytes / base.kv_cache_bytes,
            "weight_bytes_ratio": ours.weight_bytes / base.weight_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "transformers": asdict(self.transformers),
            "xpu_coopt": asdict(self.xpu_coopt),
            "ratios": self.ratios,
            "runs": {name: [asdict(run) for run in runs] for name, runs in self.runs.items()},
        }


def summarise_steps(start: float, step_times: list[float], tokens: int, kv_bytes: int) -> RunResult:
    """A generation's latencies from its start and the time each step's tokens were chosen (index 0: the
    first token); tokens: all it generated, for the throughput."""
    gaps = [(b - a) * 1e3 for a, b in itertools.pairwise(step_times)]
    total = step_times[-1] - start
    return RunResult(
        first_token_ms=(step_times[0] - start) * 1e3,
        next_token_ms_mean=statistics.fmean(gaps) if gaps else float("nan"),
        next_token_ms_p90=statistics.quantiles(gaps, n=10)[-1] if len(gaps) >= 2 else float("nan"),
        throughput_tokens_per_s=tokens / total,
        kv_cache_bytes=kv_bytes,
    )


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA, XPU); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


class StepClock:
    """A transformers logits processor that only records when each step's logits arrive."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def _generate_kwargs(settings: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Greedy or beam search; with several sequences per prompt, sampling them (each side's own default
    warpers, which are transformers' on both)."""
    samples = settings["num_return_sequences"]
    return dict(
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        num_beams=settings["num_beams"],
        do_sample=samples > 1,
        num_return_sequences=samples,
        eos_token_id=settings["eos_token_id"],
        pad_token_id=settings["pad_token_id"],
    )


def _generated_tokens(input_ids: torch.Tensor, settings: dict[str, Any], tokens: int) -> int:
    return input_ids.shape[0] * settings["num_return_sequences"] * tokens


def _hf_kv_tensors(cache: Any) -> list[torch.Tensor]:
    # Benchmark-only introspection of transformers' DynamicCache (not used by the library itself).
    tensors = []
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                tensors.append(tensor)
    return tensors


def _hf_cache(out: Any) -> Any:
    # transformers 5.24 renamed generate()'s past_key_values output to cache (the old name warns).
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def run_transformers(model, input_ids, mask, settings, tokens: int) -> RunResult:
    from transformers import LogitsProcessorList

    clock = StepClock(input_ids.device)
    synchronize(input_ids.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=mask, logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True, **_generate_kwargs(settings, tokens),
        )  # fmt: skip
    generated = _generated_tokens(input_ids, settings, tokens)
    kv = _hf_kv_tensors(_hf_cache(out))
    result = summarise_steps(start, clock.times, generated, sum(t.numel() * t.element_size() for t in kv))
    result.largest_kv_allocation = max((t.numel() * t.element_size() for t in kv), default=0)
    return result


def run_xpu_coopt(model, input_ids, mask, settings, tokens: int) -> RunResult:
    synchronize(input_ids.device)
    start = time.perf_counter()
    out = model.generate(
        input_ids, attention_mask=mask, return_dict_in_generate=True, **_generate_kwargs(settings, tokens)
    )
    generated = _generated_tokens(input_ids, settings, tokens)
    result = summarise_steps(start, out.step_times, generated, out.kv_cache_bytes)
    result.largest_kv_allocation = out.kv_largest_allocation
    result.decode_graph_captures = out.decode_graph_captures
    return result


def random_prompts(
    vocab_size: int, batch_size: int, input_tokens: int, min_input_tokens: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [batch_size, input_tokens] of random token ids from 3 up (below: special
    tokens in LLaMA vocabularies); with min_input_tokens, row r holds a prompt of min_input_tokens + (input_tokens -
    min_input_tokens) * r / (batch_size - 1) tokens, left-padded with token 0."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, input_tokens), generator=generator)
    mask = torch.ones_like(input_ids)
    if min_input_tokens is not None:
        for row in range(batch_size):
            length = min_input_tokens + (input_tokens - min_input_tokens) * row // max(batch_size - 1, 1)
            input_ids[row, : input_tokens - length] = 0  # left padding (the pad token)
            mask[row, : input_tokens - length] = 0
    return input_ids, mask


def benchmark(
    hf_model: Any,
    *,
    dtype: torch.dtype,
    batch_size: int,
    input_tokens: int,
    output_tokens: int,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    kv_dtype: str = "auto",
    backend: str = "auto",
    repeats: int = 1,
    seed: int = 0,
    progress: bool = True,
    cuda_graph: bool | None = None,
    pack_shared_weights: bool = False,
    keep_decode_graph: bool = False,
    kv_cache: str = "segment",
    min_input_tokens: int | None = None,
    weight_dtype: str = "auto",
    group_size: int = 128,
    optimized: Any = None,
    tensor_parallel: int = 1,
) -> BenchResult:
    """Times both implementations on the same random prompts; keeps the best (fastest) of `repeats` runs each.
    num_return_sequences > 1 (with num_beams 1) samples that many sequences of each prompt, with the same
    seed on both sides.
    xpu_coopt's KV cache and decode graph, which generate() keeps for the next call that fits them
    (OptimizedModel.keep_cache), are freed after each of its runs, so that transformers never runs beside
    them (a batch-64 llama-2-7b cache is 37 GB) and each run captures its own graph. keep_decode_graph
    leaves them kept: with CUDA graphs the runs after the first then replay the first's graph, as a
    later generate() of the same shape does.
    min_input_tokens: prompts of unequal lengths, spread evenly from it to input_tokens over the batch and
    left-padded (what a paged KV cache stores without its padding); None: every prompt input_tokens long.
    weight_dtype, group_size, tensor_parallel: optimize()'s (with tensor parallelism transformers' side runs
    whole on each rank). optimized: xpu_coopt's side made already (from_pretrained of a
    4-bit checkpoint, which transformers' side loads its own way), instead of optimize(hf_model)."""
    if num_return_sequences > 1 and num_beams > 1:
        raise ValueError("num_return_sequences > 1 samples sequences, which needs num_beams=1")
    if min_input_tokens is not None and not 1 <= min_input_tokens <= input_tokens:
        raise ValueError(
            f"min_input_tokens must lie in 1..input_tokens ({input_tokens}), got {min_input_tokens}"
        )
    device = next(hf_model.parameters()).device
    # inplace=True lets optimize() share the fused matrices with transformers where the backend keeps them
    # plain (weights held once); it converts nothing here (same dtype), so transformers' results are unchanged.
    # Not with tensor parallelism: it would release the projections transformers' side runs.
    if optimized is None:
        optimized = xpu_coopt.optimize(
            hf_model, dtype=dtype, kv_dtype=kv_dtype, backend=backend, inplace=tensor_parallel == 1,
            cuda_graph=cuda_graph, pack_shared_weights=pack_shared_weights, kv_cache=kv_cache,
            weight_dtype=weight_dtype, group_size=group_size, tensor_parallel=tensor_parallel,
        )  # fmt: skip
    input_ids, mask = random_prompts(
        optimized.spec.vocab_size, batch_size, input_tokens, min_input_tokens, seed
    )
    input_ids, mask = input_ids.to(device), mask.to(device)
    settings = dict(
        dtype=str(dtype).removeprefix("torch."), batch_size=batch_size, input_tokens=input_tokens,
        min_input_tokens=min_input_tokens, output_tokens=output_tokens, num_beams=num_beams,
        num_return_sequences=num_return_sequences, kv_dtype=kv_dtype, kv_cache=kv_cache,
        weight_dtype=optimized.weight_dtype,
        pack_shared_weights=pack_shared_weights, keep_decode_graph=keep_decode_graph, device=str(device),
        repeats=repeats, tensor_parallel=tensor_parallel, **_environment(optimized),
    )  # fmt: skip
    runners = {"transformers": (run_transformers, hf_model), "xpu_coopt": (run_xpu_coopt, optimized)}
    runs = _timed_runs(runners, optimized, (input_ids, mask), settings, seed, progress)
    best = {name: min(results, key=lambda r: r.next_token_ms_mean) for name, results in runs.items()}
    weight_bytes = {"transformers": held_bytes(hf_model.parameters()), "xpu_coopt": optimized.weight_bytes()}
    for name, results in runs.items():
        for result in results:
            result.weight_bytes = weight_bytes[name]
    return BenchResult(best["transformers"], best["xpu_coopt"], settings, runs)


def _environment(optimized: Any) -> dict[str, Any]:
    """What else a result depends on: the backend's choices, the threads, the software, the date."""
    return dict(
        backend=optimized.backend, cuda_graph=optimized.cuda_graph, gemm_fusions=optimized.decoder.fusions is not None,
        threads=torch.get_num_threads(), eos_token_id=2, pad_token_id=0, torch=torch.__version__,
        transformers=importlib.metadata.version("transformers"), date=time.strftime("%Y-%m-%d"),
    )  # fmt: skip


def _timed_runs(runners, optimized, prompts, settings: dict[str, Any], seed: int, progress: bool):  # fmt: skip
    """Each side's timed runs (settings' repeats of them, after a warm-up round of 2 tokens), alternating
    sides, every run from the same seed so that sampling draws the same numbers on both."""
    runs: dict[str, list[RunResult]] = {name: [] for name in runners}
    plan = [(name, r) for r in range(settings["repeats"] + 1) for name in runners]
    for name, round_index in tqdm(plan, desc="bench", disable=not progress):
        run, model = runners[name]
        tokens = 2 if round_index == 0 else settings["output_tokens"]
        torch.manual_seed(seed)
        result = run(model, *prompts, settings, tokens)
        if model is optimized and not settings["keep_decode_graph"]:
            optimized.release_cache()
        if round_index:
            runs[name].append(result)
    return runs


def _speedup(ratio: float) -> str:
    """A speedup ratio in words: '2.00x faster', or '0.96x (slower)' below 1."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{ratio:.2f}x (slower)"


def format_result(result: BenchResult) -> str:
    base, ours, ratios = result.transformers, result.xpu_coopt, result.ratios
    mib = 2**20
    rows = [
        ("metric", "transformers", "xpu_coopt", "ratio"),
        ("first token (ms)", f"{base.first_token_ms:.1f}", f"{ours.first_token_ms:.1f}",
         _speedup(ratios["first_token_speedup"])),
        ("next token mean (ms)", f"{base.next_token_ms_mean:.2f}", f"{ours.next_token_ms_mean:.2f}",
         _speedup(ratios["next_token_speedup"])),
        ("next token p90 (ms)", f"{base.next_token_ms_p90:.2f}", f"{ours.next_token_ms_p90:.2f}", ""),
        ("throughput (tok/s)", f"{base.throughput_tokens_per_s:.1f}", f"{ours.throughput_tokens_per_s:.1f}",
         f"{ratios['throughput_ratio']:.2f}x"),
        ("KV cache (MiB)", f"{base.kv_cache_bytes / mib:.1f}", f"{ours.kv_cache_bytes / mib:.1f}",
         f"{ratios['kv_bytes_ratio']:.2f}x"),
        ("largest KV allocation (MiB)", f"{base.largest_kv_allocation / mib:.1f}",
         f"{ours.largest_kv_allocation / mib:.1f}", ""),
        ("weights (MiB)", f"{base.weight_bytes / mib:.1f}", f"{ours.weight_bytes / mib:.1f}",
         f"{ratios['weight_bytes_ratio']:.2f}x"),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    settings = ", ".join(f"{k}={v}" for k, v in result.settings.items())
    return "\n".join([settings, *lines])
