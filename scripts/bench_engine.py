"""Throughput of the continuous-batching engine against generate() one request at a time, same requests,
same process (issue 38's first measure; the HTTP server and its load generator come later).

    python scripts/bench_engine.py [--requests 16] [--min-prompt 32] [--max-prompt 256] [--max-tokens 64]

The embedded SmolLM2-135M in bfloat16 (transformers' dequantization of its GGUF, then optimize()); prompts
of random token ids with lengths uniform in [min, max], greedy, every request run to max_tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

import xpu_coopt
from xpu_coopt import LLM, SamplingParams
from xpu_coopt.checkpoints import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_model, _ = load_model("smollm2-135m", torch.bfloat16, "cpu")
    model = xpu_coopt.optimize(hf_model)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(
        args.min_prompt, args.max_prompt + 1, (args.requests,), generator=generator
    ).tolist()
    prompts = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in lengths]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    llm = LLM(model, kv_cache_memory=256 << 20, max_num_batched_tokens=args.max_num_batched_tokens)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), progress=False)  # warm up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, progress=False)
    engine_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for prompt in prompts:
        model.generate(
            torch.tensor([prompt]),
            max_new_tokens=args.max_tokens,
            min_new_tokens=args.max_tokens,
            do_sample=False,
        )
    alone_seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    print(f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, {args.max_tokens} new each, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"engine:           {tokens / engine_seconds:7.1f} output tokens/s ({engine_seconds:.1f} s)")
    print(f"generate() alone: {tokens / alone_seconds:7.1f} output tokens/s ({alone_seconds:.1f} s)")
    print(f"ratio: {alone_seconds / engine_seconds:.2f}x; preemptions {llm.engine.scheduler.preemptions}")


if __name__ == "__main__":
    main()
