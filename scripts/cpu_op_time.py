"""The CPU backend's decode attention and GEMMs alone, for A/B runs across commits (as step_time.py).

Times the checkout it is imported from on SmolLM2-135M's shapes in bfloat16 with random values:
- attention: the reference segment_attention_decode of one query token per request over a prompt
  segment of --columns columns, the requests' prompts spread from 128 columns to all of them (left
  padding), one beam;
- linear: cpu_gemm.linear over each projection (fused q/k/v, o, fused gate/up, down, LM head).
Prints the median of --repeats calls of each, in ms.

    for i in 1 2; do for tree in OLD NEW; do PYTHONPATH=$tree python scripts/cpu_op_time.py --label $tree; done; done
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from xpu_coopt.backends.cpu import cpu_kernels
from xpu_coopt.backends.cpu import gemm as cpu_gemm

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 9, 3, 64, 576
PROJECTIONS = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def attention_call(requests: int, columns: int) -> Callable[[], None]:
    dtype = torch.bfloat16
    query = torch.randn(requests, HEADS, HEAD_DIM, dtype=dtype)
    prompt_k, prompt_v = (torch.randn(requests, KV_HEADS, columns, HEAD_DIM, dtype=dtype) for _ in range(2))
    lengths = torch.linspace(128, columns, requests).long() if requests > 1 else torch.tensor([columns])
    prompt_start = (columns - lengths).to(torch.int32)
    response = torch.empty(requests, KV_HEADS, 0, HEAD_DIM, dtype=dtype)
    beam_slots = torch.zeros(requests, 0, dtype=torch.int32)
    out = torch.empty_like(query)
    return lambda: cpu_kernels().segment_attention_decode(
        out, query, prompt_k, prompt_v, None, None, prompt_start, response, response, None, None, beam_slots,
        0, HEAD_DIM**-0.5, "auto",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="")
    parser.add_argument("--requests", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--columns", type=int, default=1056)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64], help="GEMM activation rows")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timings = [
        f"attention R={n} {median_ms(attention_call(n, args.columns), args.repeats):.2f}"
        for n in args.requests
    ]
    for rows in args.rows:
        for name, shape in PROJECTIONS.items():
            weight, x = (
                torch.randn(shape, dtype=torch.bfloat16),
                torch.randn(rows, shape[1], dtype=torch.bfloat16),
            )
            call = functools.partial(cpu_gemm.linear, x, weight)
            timings.append(f"{name} rows={rows} {median_ms(call, args.repeats):.2f}")
    print(args.label, "|", " | ".join(timings))


if __name__ == "__main__":
    main()
