"""The `xpu-coopt` command: `xpu-coopt bench ...`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fmt: skip


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _bench_parser(subparsers) -> None:
    from xpu_coopt.models import DEFAULT_MODEL, SHAPE_PRESETS
    from xpu_coopt.ops import KV_FORMATS

    bench = subparsers.add_parser(
        "bench",
        help="time transformers and xpu_coopt side by side on the same inputs",
        description="Runs transformers' generate and xpu_coopt's in one process on the same random prompts "
        "and prints first-token latency, next-token latency (mean, p90), throughput, KV cache bytes and ratios.",
    )
    bench.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"'{DEFAULT_MODEL}' (embedded, default), a shape preset with random weights "
                       f"({', '.join(SHAPE_PRESETS)}), a local HF folder, a .gguf or a llama2.c .bin file")  # fmt: skip
    bench.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    bench.add_argument("--device", default="cpu", help="cpu, cuda or xpu (default cpu)")
    bench.add_argument("--backend", default="auto", help="auto, torch, sycl or triton")
    bench.add_argument("--batch-size", type=_positive, default=1)
    bench.add_argument("--input-tokens", type=_positive, default=1024)
    bench.add_argument("--output-tokens", type=_positive, default=32)
    bench.add_argument("--num-beams", type=_positive, default=1)
    bench.add_argument("--kv-dtype", default="auto", choices=KV_FORMATS)
    bench.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: torch's)")
    bench.add_argument("--repeats", type=_positive, default=1, help="timed runs per side; the best is kept")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


def _run_bench(args: argparse.Namespace) -> int:
    from xpu_coopt.bench import benchmark, format_result
    from xpu_coopt.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"loading {args.model} ({args.dtype}) on {device} ...", file=sys.stderr)
    model, _ = load_model(args.model, DTYPES[args.dtype], device)
    result = benchmark(
        model, dtype=DTYPES[args.dtype], batch_size=args.batch_size, input_tokens=args.input_tokens,
        output_tokens=args.output_tokens, num_beams=args.num_beams, kv_dtype=args.kv_dtype,
        backend=args.backend, repeats=args.repeats,
    )  # fmt: skip
    result.settings["model"] = args.model
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result.to_dict(), handle, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xpu-coopt", description="xpu_coopt: fast LLaMA-family inference")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _bench_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return {"bench": _run_bench}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"xpu-coopt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
