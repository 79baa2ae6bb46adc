"""Where a decode step's GPU time goes (run by hand on a GPU): kernel time per kind of kernel over a few
decode steps, against the wall time of one step replayed as a CUDA graph and the weight-read floor. The
profiled steps launch the graph's kernels one by one (a cuda_graph=False model would run torch's GEMMs
instead, see xpu_coopt.optimize). --unfused: decode steps without the GEMM fusions, to compare.

    python scripts/profile_decode_step.py [--model llama-2-7b] [--batch-size 1] [--input-tokens 1024]
        [--num-beams 4] [--kv-dtype fp8_e4m3] [--unfused] [decode launch options]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import xpu_coopt
from xpu_coopt.backends.triton.tuning import add_decode_launch_arguments, apply_decode_launch
from xpu_coopt.checkpoints import load_model

STEPS = 8
KINDS = {  # substring of a kernel's name -> what it is
    "segment_attention_decode": "decode attention",
    "combine_splits": "decode attention (combine)",
    "rotary_kv_write": "rotary + KV write",
    "rms_norm": "RMSNorm (+ residual add)",
    "silu_and_mul": "SiLU * mul",
    "skinny_linear": "GEMM (Triton, few rows; norms, SiLU, residual adds fused in)",
    "gemv": "GEMM (cuBLAS GEMV)",
    "gemm": "GEMM (cuBLAS)",
    "sm90": "GEMM (cuBLAS)",
    "cutlass": "GEMM (cuBLAS)",
}


def kind(name: str) -> str:
    lowered = name.lower()
    return next((label for key, label in KINDS.items() if key in lowered), f"other: {name[:60]}")


def decode_steps(model, ids, steps: int, beams: int, profiler=None) -> float:
    """Prefill, one decode step, then `steps` more (profiled when a profiler is given); returns their mean
    wall time (ms). With beams, every beam follows its own argmax (no reordering: the model's work per
    step is a beam step's, the beam search's own bookkeeping is left out)."""
    logits, cache = model.prefill(ids, num_beams=beams, max_new_tokens=steps + 4)
    token = logits.argmax(-1).repeat_interleave(beams)
    token = model.decode(token, cache).argmax(-1)  # the first step captures the graph, if any
    torch.cuda.synchronize()
    if profiler is not None:
        profiler.start()
    start = time.perf_counter()
    for _ in range(steps):
        token = model.decode(token, cache).argmax(-1)
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps * 1e3
    if profiler is not None:
        profiler.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--kv-dtype", default="auto", help="the KV cache's format: auto, fp8_e4m3, fp8_e5m2")
    parser.add_argument("--peak-gbs", type=float, default=3350.0)
    parser.add_argument("--unfused", action="store_true", help="GEMMs without the norm/SiLU/residual fusions")
    add_decode_launch_arguments(parser)
    args = parser.parse_args()
    print(f"decode kernel: {apply_decode_launch(args)}")
    hf_model, _ = load_model(args.model, torch.float16, "cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    ids = torch.randint(3, hf_model.config.vocab_size, (args.batch_size, args.input_tokens), device="cuda")
    graphed = xpu_coopt.optimize(hf_model, cuda_graph=True, kv_dtype=args.kv_dtype)
    eager = xpu_coopt.optimize(hf_model, cuda_graph=True, kv_dtype=args.kv_dtype)
    eager.cuda_graph = False  # the graph's kernels, each launched on its own so that the profiler sees it
    if args.unfused:
        graphed.decoder.fusions = eager.decoder.fusions = None
    print(f"GEMM fusions: {'off' if args.unfused else 'on'}")
    decode_steps(eager, ids, 2, args.num_beams)
    prof = profile(activities=[ProfilerActivity.CUDA])
    eager_ms = decode_steps(eager, ids, STEPS, args.num_beams, prof)
    graph_ms = min(decode_steps(graphed, ids, 32, args.num_beams) for _ in range(3))
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            totals[kind(event.key)] += event.device_time_total / 1e3
            counts[kind(event.key)] += event.count
    steps = STEPS
    floor = weight_bytes / args.peak_gbs / 1e6
    print(f"weights {weight_bytes / 1e9:.2f} GB: read floor {floor:.2f} ms at {args.peak_gbs:.0f} GB/s")
    print(
        f"decode step: graph replay {graph_ms:.2f} ms ({graph_ms / floor:.2f}x the floor), "
        f"its kernels launched eagerly {eager_ms:.2f} ms"
    )
    print("kernel time per decode step (eager steps, profiled):")
    for label, total in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {label:<40} {total / steps:7.3f} ms  {counts[label] / steps:6.1f} launches")


if __name__ == "__main__":
    main()
