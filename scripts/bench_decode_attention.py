"""Decode-attention microbenchmark on a GPU: achieved memory bandwidth of segment_attention_decode.

One query token per sequence over a prompt segment of `context` tokens (llama-2-7b's attention by default:
32 query heads, 32 KV heads, head_dim 128), and with --beams and --response a response segment of that many
steps per beam, its histories as beam search leaves them. The bytes counted are the fewest the op must
move: every K/V row of the prompt segment and every distinct response row read once (FP8: codes plus
bfloat16 scales), the query read and the output written.
Several layers' caches are cycled so that no run is served from L2. Each time is the median of
triton.testing.do_bench. The peak is the card's measured device-to-device copy rate (bytes read plus
written), reported beside the datasheet figure given with --datasheet-gbs.

    python scripts/bench_decode_attention.py [--backend triton] [--kv-dtype auto fp8_e4m3] [--json FILE]
    python scripts/bench_decode_attention.py --beams 4 --response 128 --contexts 1024   # beam search
    python scripts/bench_decode_attention.py --device-lengths   # the kernel as a replayed decode graph runs it
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import pstats

import torch
import triton.testing

from xpu_coopt.backends import resolve_backend
from xpu_coopt.backends.triton.tuning import (
    add_decode_launch_arguments,
    add_device_lengths_argument,
    apply_decode_launch,
)
from xpu_coopt.ops import fp8

SCALE_BYTES = 2  # bfloat16


def measured_copy_gbs(device: str) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    source = torch.randn(256 * 1024 * 1024, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=50, rep=400, return_mode="median")
    return 2 * source.numel() * source.element_size() / ms / 1e6


def _cells(shape, kv_dtype: str, dtype, device) -> tuple[torch.Tensor, torch.Tensor, object, object]:
    """(k, v, k_scale, v_scale) caches of `shape`: random 16-bit values, or random finite FP8 codes of both
    signs (0x7f / 0xff are NaN in e4m3) with small bfloat16 scales."""
    if not fp8.is_fp8(kv_dtype):
        return (
            torch.randn(shape, dtype=dtype, device=device),
            torch.randn(shape, dtype=dtype, device=device),
            None,
            None,
        )
    k = torch.randint(0, 0x7F, shape, dtype=torch.uint8, device=device) | (
        torch.randint(0, 2, shape, dtype=torch.uint8, device=device) << 7
    )
    k_scale = torch.rand(shape[:-1], device=device).to(fp8.SCALE_DTYPE) / 64
    v_scale = torch.rand(shape[:-1], device=device).to(fp8.SCALE_DTYPE) / 64
    return k, k.roll(1, dims=-1), k_scale, v_scale


def make_case(args, context: int, kv_dtype: str) -> tuple[list, int, int]:
    """(calls, layers, bytes): the arguments of one decode call for each of `layers` caches (enough that L2
    serves none of them), and the fewest bytes a call must move. args.beams sequences a request; with
    args.response steps, each beam's history is a random path through the request's beams' rows, as beam
    reordering leaves it, and the bytes count each distinct response cell once."""
    device, dtype = args.device, torch.float16
    requests, beams, heads, kv_heads, dim = args.batch, args.beams, args.heads, args.kv_heads, args.head_dim
    steps, seqs = args.response, args.batch * args.beams
    row_bytes = dim + SCALE_BYTES if fp8.is_fp8(kv_dtype) else dim * 2
    generator = torch.Generator().manual_seed(context)
    slots = torch.arange(seqs, dtype=torch.int32)[:, None].repeat(1, steps)
    if steps:  # step t of sequence s: a row of its own request; the newest step is its own row
        slots[:, :-1] = (torch.arange(seqs) // beams * beams)[:, None] + torch.randint(
            0, beams, (seqs, steps - 1), generator=generator, dtype=torch.int32
        )
    per_request = slots.view(requests, beams, steps)
    distinct_cells = sum(
        len(torch.unique(per_request[r, :, t])) for r in range(requests) for t in range(steps)
    )
    kv_bytes = 2 * kv_heads * row_bytes * (requests * context + distinct_cells)
    layers = max(2, -(-args.min_cycle_bytes // kv_bytes))
    k, v, k_scale, v_scale = _cells((layers, requests, kv_heads, context, dim), kv_dtype, dtype, device)
    rk, rv, rk_scale, rv_scale = _cells((layers, seqs, kv_heads, steps, dim), kv_dtype, dtype, device)
    query = torch.randn(seqs, heads, dim, dtype=dtype, device=device)
    out = torch.empty_like(query)
    start = torch.zeros(requests, dtype=torch.int32, device=device)
    slots = slots.to(device)

    def pick(cache, i):
        return None if cache is None else cache[i]

    # --device-lengths: the segments' lengths in a device tensor, as a decode step replayed in a graph
    # passes them (the kernel's other specialisation).
    lengths = (
        (torch.tensor([context, steps], dtype=torch.int32, device=device),) if args.device_lengths else ()
    )
    calls = [
        (out, query, k[i], v[i], pick(k_scale, i), pick(v_scale, i), start, rk[i], rv[i], pick(rk_scale, i),
         pick(rv_scale, i), slots, steps, dim**-0.5, kv_dtype, *lengths)
        for i in range(layers)
    ]  # fmt: skip
    return calls, layers, kv_bytes + 2 * query.numel() * query.element_size()


def bench_case(ops, args, context: int, kv_dtype: str) -> dict:
    calls, layers, moved = make_case(args, context, kv_dtype)
    layer = [0]

    def run() -> None:
        layer[0] = (layer[0] + 1) % layers
        ops.kernels.segment_attention_decode(*calls[layer[0]])

    # Kernel time: the calls over all cached layers captured once as a CUDA graph (as decode runs them),
    # replayed; eager time: one call at a time, Python launch overhead included.
    eager_ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            run()
    ms = triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median") / layers
    if args.profile and context == args.contexts[0]:
        profile = cProfile.Profile()
        profile.runcall(lambda: [run() for _ in range(200)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    return {"context": context, "kv_dtype": kv_dtype, "batch": args.batch, "beams": args.beams,
            "response": args.response, "device_lengths": args.device_lengths, "ms": ms, "eager_ms": eager_ms, "bytes": moved, "gbs": moved / ms / 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--beams", type=int, default=1, help="sequences a request (a shared prompt segment)")
    parser.add_argument("--response", type=int, default=0, help="response steps each beam has generated")
    add_device_lengths_argument(parser)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--kv-dtype", nargs="+", default=["auto", "fp8_e4m3"])
    parser.add_argument("--min-cycle-bytes", type=int, default=512 * 2**20)
    parser.add_argument("--datasheet-gbs", type=float, default=3350.0, help="H100 SXM5 HBM3: 3.35 TB/s")
    add_decode_launch_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="profile 200 eager calls of the first context")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    launch = apply_decode_launch(args)
    print(f"decode kernel: {launch}")
    ops = resolve_backend(args.backend, torch.device(args.device))
    peak = measured_copy_gbs(args.device)
    print(
        f"{torch.cuda.get_device_name()}: measured copy {peak:.0f} GB/s, datasheet {args.datasheet_gbs:.0f} GB/s"
    )
    rows = [bench_case(ops, args, c, f) for f in args.kv_dtype for c in args.contexts]
    header = ("kv_dtype", "batch", "beams", "response", "context", "eager us", "kernel us", "GB/s", "% copy",
              "% datasheet")  # fmt: skip
    print(" ".join(f"{h:>11}" for h in header))
    for r in rows:
        r["pct_copy"], r["pct_datasheet"] = 100 * r["gbs"] / peak, 100 * r["gbs"] / args.datasheet_gbs
        cells = (r["kv_dtype"], r["batch"], r["beams"], r["response"], r["context"], f"{1000 * r['eager_ms']:.1f}",
                 f"{1000 * r['ms']:.1f}", f"{r['gbs']:.0f}", f"{r['pct_copy']:.1f}%", f"{r['pct_datasheet']:.1f}%")  # fmt: skip
        print(" ".join(f"{c:>11}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": peak,
                       "datasheet_gbs": args.datasheet_gbs, "backend": args.backend,
                       "launch": dataclasses.asdict(launch), "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
