"""Decode-step GEMM microbenchmark on a GPU: torch's F.linear (cuBLAS) against xpu_coopt's Triton
skinny GEMM (xpu_coopt/backends/triton/linear.py) on a shape preset's projections (llama-2-7b by default), a
few activation rows.

Bytes counted: the weight once (activations are noise beside it). Several copies of each weight are
cycled so that L2 serves none of them; each time is the median of triton.testing.do_bench over a CUDA
graph of the calls, divided by the calls. The Triton side is timed with the launch the wrapper chooses
(skinny_launch) and with every launch of a grid, the fastest reported beside it; the per-step totals weigh
each shape by its calls per decode step.

    python scripts/bench_linear.py [--model llama-2-7b] [--rows 1 4 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch
import torch.nn.functional as F
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from xpu_coopt.backends.triton.linear import SkinnyLaunch, launch_skinny_linear, skinny_launch
from xpu_coopt.checkpoints import SHAPE_PRESETS, preset_config
from xpu_coopt.model.spec import model_spec


def projection_shapes(preset: str) -> tuple[tuple[str, int, int, int], ...]:
    """(name, N, K, calls per decode step) of each projection of a shape preset (xpu_coopt.checkpoints), read
    from its config as optimize() reads it."""
    config = preset_config(preset)
    spec = model_spec(config, config.architectures[0])
    hidden, layers, attention = spec.hidden_size, spec.num_layers, spec.num_heads * spec.head_dim
    qkv = attention + 2 * spec.num_kv_heads * spec.head_dim
    return (("qkv", qkv, hidden, layers), ("o_proj", hidden, attention, layers),
            ("gate_up", 2 * spec.intermediate_size, hidden, layers),
            ("down_proj", hidden, spec.intermediate_size, layers), ("lm_head", spec.vocab_size, hidden, 1))  # fmt: skip


DOT_GRID = [SkinnyLaunch(True, *c) for c in itertools.product([16, 32, 64], [128, 256], [4, 8], [4, 5, 6])]
ELEMENTWISE_GRID = [
    SkinnyLaunch(False, *c) for c in itertools.product([4, 8, 16], [512, 1024], [4, 8], [3, 4])
]


def graph_ms(call, copies: int) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    return triton.testing.do_bench(graph.replay, warmup=10, rep=80, return_mode="median") / copies


def bench_shape(name: str, n: int, k: int, rows: int, args) -> dict:
    weight_bytes = n * k * 2
    copies = max(2, -(-args.min_cycle_bytes // weight_bytes))
    weights = [torch.randn(n, k, dtype=torch.float16, device="cuda") / k**0.5 for _ in range(copies)]
    x = torch.randn(rows, k, dtype=torch.float16, device="cuda")
    expected = F.linear(x, weights[0])
    out = torch.empty(rows, n, dtype=torch.float16, device="cuda")
    cublas_out = torch.empty_like(out)
    cublas_ms = graph_ms(lambda i: torch.matmul(x, weights[i].t(), out=cublas_out), copies)
    chosen = skinny_launch(rows)
    times = {}
    grid = args.candidates or DOT_GRID + (ELEMENTWISE_GRID if rows == 1 else [])
    for launch in [chosen, *grid]:
        if launch in times:
            continue
        try:
            launch_skinny_linear(out, x, weights[0], None, launch)
        except OutOfResources as error:  # too much shared memory for the card
            print(f"  {launch}: {error}")
            continue
        error = (out.float() - expected.float()).abs().max().item()
        if error > 2e-2:
            raise AssertionError(f"{name} rows {rows} {launch}: max error {error}")
        times[launch] = graph_ms(
            lambda i, launch=launch: launch_skinny_linear(out, x, weights[i], None, launch), copies
        )
    ranked = sorted(times, key=times.get)
    weights.clear()
    torch.cuda.empty_cache()
    best, chosen_ms = times[ranked[0]], times[chosen]
    row = {"shape": name, "n": n, "k": k, "rows": rows, "cublas_ms": cublas_ms, "chosen_ms": chosen_ms,
           "chosen": dataclasses.asdict(chosen), "best_ms": best, "best": dataclasses.asdict(ranked[0]),
           "top": [(dataclasses.asdict(c), times[c]) for c in ranked[:5]]}  # fmt: skip
    gbs = {key: weight_bytes / row[key] / 1e6 for key in ("cublas_ms", "chosen_ms", "best_ms")}
    print(
        f"{name:>10} rows {rows:>2}: cuBLAS {1000 * cublas_ms:6.1f} us {gbs['cublas_ms']:4.0f} GB/s | "
        f"Triton chosen {1000 * chosen_ms:6.1f} us {gbs['chosen_ms']:4.0f} GB/s | "
        f"best {1000 * best:6.1f} us {gbs['best_ms']:4.0f} GB/s {ranked[0]}",
        flush=True,
    )
    for launch in ranked[1:4]:
        print(f"{'':>20} {1000 * times[launch]:6.1f} us {launch}")
    return row


def parse_launch(text: str) -> SkinnyLaunch:
    dot, block_n, block_k, warps, stages = (int(v) for v in text.split(","))
    return SkinnyLaunch(bool(dot), block_n, block_k, warps, stages)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-2-7b", choices=sorted(SHAPE_PRESETS), help="shape preset")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--min-cycle-bytes", type=int, default=256 * 2**20)
    parser.add_argument(
        "--candidate",
        dest="candidates",
        action="append",
        type=parse_launch,
        metavar="DOT,N,K,WARPS,STAGES",
        help="time this launch instead of the grid (repeatable), e.g. 0,4,1024,8,3 (DOT 0: elementwise)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "triton", triton.__version__, args.model)
    shapes = projection_shapes(args.model)
    rows = [bench_shape(name, n, k, r, args) for r in args.rows for name, n, k, _ in shapes]
    calls = {name: c for name, _, _, c in shapes}
    for r in args.rows:
        per_rows = [row for row in rows if row["rows"] == r]
        cublas = sum(row["cublas_ms"] * calls[row["shape"]] for row in per_rows)
        chosen = sum(row["chosen_ms"] * calls[row["shape"]] for row in per_rows)
        best = sum(row["best_ms"] * calls[row["shape"]] for row in per_rows)
        print(
            f"rows {r}: one decode step's GEMMs: cuBLAS {cublas:.3f} ms, Triton {chosen:.3f} ms "
            f"(the best launch of each shape: {best:.3f} ms)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "model": args.model, "rows": rows}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
