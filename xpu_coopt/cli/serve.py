"""`xpu-coopt serve`: the OpenAI-compatible server over the continuous-batching engine."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from pathlib import Path

from xpu_coopt.cli.arguments import (
    cache_arguments,
    join_ranks,
    model_with_tokenizer_arguments,
    positive,
    runtime_arguments,
    tensor_parallel_argument,
    weight_arguments,
)

API_KEY_VARIABLE = "XPU_COOPT_API_KEY"
SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(text: str) -> int:
    """A byte count, with an optional K, M or G suffix (binary)."""
    scale = SIZE_SUFFIXES.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 1073741824, 512M, 2G)")
    return int(digits) * scale


def fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1] (e.g. 0.5)")
    return value


def serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Runs the continuous-batching engine behind /v1/completions, /v1/chat/completions, "
        "/v1/models, /health and /metrics (needs xpu_coopt[serve]: FastAPI, uvicorn, prometheus_client).",
    )
    model_with_tokenizer_arguments(parser)
    runtime_arguments(parser)
    cache_arguments(parser)
    parser.add_argument("--kv-scales", help=argparse.SUPPRESS)
    weight_arguments(
        parser, "--weight-dtype", "auto (default: as stored), int4 or int8 (quantized while loading)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=positive, default=8000)
    parser.add_argument(
        "--served-model-name", help="the model's name in the API (default: --model's file or folder name)"
    )
    pool = parser.add_mutually_exclusive_group()
    pool.add_argument("--kv-cache-memory", type=byte_size,
                      help="bytes of the KV block pool, preallocated at start (default 1G)")  # fmt: skip
    pool.add_argument("--kv-cache-fraction", type=fraction, metavar="F",
                      help="the KV pool takes F of the memory the device has free once the model is loaded "
                      "(vLLM's --gpu-memory-utilization, of what the model left)")  # fmt: skip
    parser.add_argument(
        "--block-size", type=positive, default=16, help="tokens a KV block holds (default 16)"
    )
    parser.add_argument("--max-num-batched-tokens", type=positive, default=256,
                        help="tokens a step computes at most: prompts are prefilled in chunks of it (default 256)")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=positive, default=64, help="sequences a step runs at most")
    parser.add_argument("--max-waiting", type=positive, default=256,
                        help="requests waiting at most; more are answered 503 (default 256)")  # fmt: skip
    tensor_parallel_argument(parser, "serve", "rank 0 serves HTTP, every rank steps its part of the engine")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"require this Bearer token on /v1/ routes (default: ${API_KEY_VARIABLE}, else none)")  # fmt: skip


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, stopping on SIGTERM or SIGINT as it does (no new requests, running ones ended,
        the engine stopped) and then returning, so the command exits 0; uvicorn itself raises the signal
        again once stopped. A second SIGINT forces the exit, as uvicorn's."""

        def handle_exit(self, sig: int, frame) -> None:
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True

    return GracefulServer


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from xpu_coopt.serve.app import create_app
    except ImportError as error:
        raise RuntimeError(f"xpu-coopt serve needs FastAPI, uvicorn and prometheus_client: pip install "
                           f"'xpu_coopt[serve]' ({error})") from None  # fmt: skip
    from transformers import PreTrainedTokenizerBase

    from xpu_coopt.serve.async_engine import AsyncEngine
    from xpu_coopt.serve.engine_core import ProcessCore, run_follower

    if args.tensor_parallel > 1:
        join_ranks(args, "serve")
        if int(os.environ["RANK"]) != 0:  # rank 0's engine shares each step's requests with this one
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it stops when rank 0 says so
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            run_follower(build_engine(args)[0])
            return 0

    core = ProcessCore(functools.partial(build_engine, args))  # the engine steps in a process of its own
    if not isinstance(core.tokenizer, PreTrainedTokenizerBase):  # the routes need its chat template, decoding
        core.stop()
        raise ValueError(f"xpu-coopt serve needs a Hugging Face tokenizer (a folder's or a GGUF's), not "
                         f"{type(core.tokenizer).__name__}")  # fmt: skip
    limits = core.limits
    name = args.served_model_name or Path(str(args.model)).name
    app = create_app(AsyncEngine(core, args.max_waiting), core.tokenizer, name, args.api_key)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({limits.num_blocks} KV blocks of "
          f"{limits.block_size} tokens)", file=sys.stderr)  # fmt: skip
    _graceful_server_class()(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run()
    return 0


def build_engine(args: argparse.Namespace):
    """(engine, tokenizer) as the command's arguments say; runs in the engine's process."""
    import torch

    from xpu_coopt.cli.commands import optimized_with_tokenizer
    from xpu_coopt.engine.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = optimized_with_tokenizer(args)
    budget = Engine.pool_bytes(model, args.kv_cache_memory, args.kv_cache_fraction)
    blocks = Engine.blocks_for_memory(model, budget, args.block_size)
    return Engine(model, blocks, args.block_size, args.max_num_batched_tokens, args.max_num_seqs), tokenizer
