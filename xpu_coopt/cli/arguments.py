"""Arguments the xpu-coopt commands share: dtypes, devices, files, the cache options, loading a model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fmt: skip


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def available_device(text: str) -> torch.device:
    """A device this torch build can use, checked before any model is loaded."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: {error}") from None
    if device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise argparse.ArgumentTypeError(
                f"{device.type} is not available: this torch ({torch.__version__}) was built without "
                f"{device.type.upper()} support or sees no such device"
            )
    return device


def existing_file(text: str) -> str:
    """A file to read, checked before any model is loaded."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs: shared by every command that runs one."""
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default=torch.device("cpu"), type=available_device,
                        help="cpu, cuda or xpu (default cpu)")  # fmt: skip
    parser.add_argument("--backend", default="auto", help="auto, torch, sycl or triton")
    parser.add_argument("--threads", type=positive, default=None, help="CPU threads (default: torch's)")


# --cuda-graph's choices as optimize()'s cuda_graph
CUDA_GRAPH_CHOICES = {"auto": None, "on": True, "off": False}


def cache_arguments(parser: argparse.ArgumentParser) -> None:
    """optimize()'s KV cache and decode-graph arguments: shared by bench and generate."""
    from xpu_coopt.cache import KV_CACHE_KINDS
    from xpu_coopt.ops import KV_DTYPES

    parser.add_argument("--kv-dtype", default="auto", choices=KV_DTYPES)
    parser.add_argument("--kv-cache", default="segment", choices=sorted(KV_CACHE_KINDS),
                        help="xpu_coopt's KV cache layout (see optimize(); default segment)")  # fmt: skip
    parser.add_argument("--cuda-graph", choices=sorted(CUDA_GRAPH_CHOICES), default="auto",
                        help="replay decode steps as a CUDA graph (auto: on for CUDA with the Triton backend)")  # fmt: skip


def weight_arguments(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """optimize()'s weight_dtype (--weight-dtype, or a list of them) and group_size."""
    parser.add_argument(flag, default="auto", help=text)
    parser.add_argument(
        "--group-size",
        type=positive,
        default=128,
        help="int4's group size (default 128; int8 is per channel)",
    )


def model_with_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    """A model that comes with its tokenizer, or a llama2.c one with --tokenizer."""
    from xpu_coopt.checkpoints import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"'{DEFAULT_MODEL}' (embedded, default), a local HF folder, a .gguf or a llama2.c .bin file")  # fmt: skip
    parser.add_argument(
        "--tokenizer", type=existing_file, help="a llama2.c tokenizer .bin, for a llama2.c model"
    )
    parser.add_argument("--verbose", action="store_true",
                        help="also print the model file's SHA-256, to compare with the published one (a GGUF "
                        "carries no checksum of its own)")  # fmt: skip


def model_arguments(parser: argparse.ArgumentParser, text_help: str) -> None:
    model_with_tokenizer_arguments(parser)
    parser.add_argument("--text", required=True, type=existing_file, help=text_help)
    parser.add_argument("--context", type=positive, default=1024, help="tokens per window (default 1024)")
    runtime_arguments(parser)
    parser.add_argument("--batch-size", type=positive, default=8, help="windows run together (default 8)")


def keeps_stored_weights(args: argparse.Namespace) -> bool:
    """Whether xpu_coopt's side loads the checkpoint itself (from_pretrained): a .gguf file or a GPTQ/AWQ
    folder with --weight-dtype auto keeps its quantized projections, which transformers would expand; a
    .gguf file or folder with --weight-dtype int4/int8 is quantized while loading, never held in 16 bits."""
    from xpu_coopt.quant.hf_quantized import quantization_config

    path = Path(args.model)
    if args.weight_dtype in ("int4", "int8"):
        return path.suffix == ".gguf" or path.is_dir()
    return args.weight_dtype == "auto" and (path.suffix == ".gguf" or quantization_config(path) is not None)


def check_runnable(args: argparse.Namespace) -> None:
    """Before loading: the threads set, what is loaded said (and with --verbose the file's SHA-256)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.model} ({args.dtype}) on {args.device} ...", file=sys.stderr)
    if args.verbose and Path(args.model).is_file():
        from xpu_coopt.disk_cache import sha256_of

        print(f"{args.model}: SHA-256 {sha256_of(Path(args.model))}", file=sys.stderr)


def load_with_tokenizer(args: argparse.Namespace):
    from xpu_coopt.checkpoints import Llama2cTokenizer, load_model

    check_runnable(args)
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.device)
    if args.tokenizer:
        tokenizer = Llama2cTokenizer(args.tokenizer)
    if tokenizer is None:
        raise ValueError(
            f"{args.model} comes without a tokenizer: pass --tokenizer (a llama2.c tokenizer .bin)"
        )
    return model, tokenizer


def read_text(path: str) -> str:
    """A text file's whole text; ValueError naming the file where it is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None


def typed_text(text: str) -> str:
    """Text from the command line or a terminal with bytes that are not UTF-8 (which Python carries as lone
    surrogates, which no tokenizer takes) as U+FFFD, the replacement character."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def tensor_parallel_argument(parser: argparse.ArgumentParser, command: str, which: str) -> None:
    parser.add_argument("--tensor-parallel", type=positive, default=1, metavar="N",
                        help=f"split the model over N processes (GPUs): run under torchrun --nproc-per-node N "
                        f"-m xpu_coopt.cli {command} ...; {which}")  # fmt: skip


def join_ranks(args: argparse.Namespace, command: str) -> None:
    """--tensor-parallel under torchrun: this rank's device (its own GPU) and, on ranks other than 0, no
    output (they generate the same tokens)."""
    if "LOCAL_RANK" not in os.environ:
        raise ValueError(f"--tensor-parallel {args.tensor_parallel} runs one process per rank: torchrun "
                         f"--nproc-per-node {args.tensor_parallel} -m xpu_coopt.cli {command} ...")  # fmt: skip
    if args.device.type in ("cuda", "xpu") and args.device.index is None:
        args.device = torch.device(args.device.type, int(os.environ["LOCAL_RANK"]))
        getattr(torch, args.device.type).set_device(args.device)
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process's streams from now on)
