"""The xpu-coopt commands: each one's parser and its run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from xpu_coopt.cli.arguments import (
    CUDA_GRAPH_CHOICES,
    DTYPES,
    cache_arguments,
    check_runnable,
    existing_file,
    join_ranks,
    keeps_stored_weights,
    load_with_tokenizer,
    model_arguments,
    model_with_tokenizer_arguments,
    positive,
    read_text,
    runtime_arguments,
    tensor_parallel_argument,
    typed_text,
    weight_arguments,
)
from xpu_coopt.cli.serve import run_serve, serve_parser


def bench_parser(subparsers) -> None:
    from xpu_coopt.checkpoints import DEFAULT_MODEL, SHAPE_PRESETS

    bench = subparsers.add_parser(
        "bench",
        help="time transformers and xpu_coopt side by side on the same inputs",
        description="Runs transformers' generate and xpu_coopt's in one process on the same random prompts "
        "and prints first-token latency, next-token latency (mean, p90), throughput, KV cache bytes and ratios.",
    )
    bench.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"'{DEFAULT_MODEL}' (embedded, default), a shape preset with random weights "
                       f"({', '.join(SHAPE_PRESETS)}), a local HF folder, a .gguf or a llama2.c .bin file")  # fmt: skip
    runtime_arguments(bench)
    bench.add_argument("--batch-size", type=positive, default=1)
    bench.add_argument("--input-tokens", type=positive, default=1024)
    bench.add_argument("--min-input-tokens", type=positive, default=None,
                       help="prompts of unequal lengths, spread evenly from this to --input-tokens over the "
                       "batch and left-padded (default: all --input-tokens long)")  # fmt: skip
    bench.add_argument("--output-tokens", type=positive, default=32)
    bench.add_argument("--num-beams", type=positive, default=1)
    bench.add_argument("--num-return-sequences", type=positive, default=1,
                       help="with one beam: sample this many sequences of each prompt (do_sample=True)")  # fmt: skip
    cache_arguments(bench)
    bench.add_argument("--repeats", type=positive, default=1, help="timed runs per side; the best is kept")
    bench.add_argument("--keep-decode-graph", action="store_true",
                       help="let each xpu_coopt run keep its KV cache and decode graph for the next, as "
                       "generate() does (transformers then runs beside that memory); by default they are "
                       "freed after each run, so every run captures its own graph")  # fmt: skip
    bench.add_argument("--pack-shared-weights", action="store_true",
                       help="bfloat16 on CPU: also pack the weights shared with transformers (a second copy "
                       "of them; faster beam search and batches), see optimize()")  # fmt: skip
    weight_arguments(bench, "--weight-dtype", "xpu_coopt's projections: auto (default: as stored; a .gguf's "
                     "quantized ones stay so, while transformers dequantizes them), int4 or int8 "
                     "(round-to-nearest)")  # fmt: skip
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    tensor_parallel_argument(bench, "bench", "xpu_coopt's side split over the ranks, transformers' whole on "
                             "each; rank 0 prints")  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    from xpu_coopt.checkpoints import load_model
    from xpu_coopt.cli.bench import benchmark, format_result

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tensor_parallel > 1:
        join_ranks(args, "bench")
    device = args.device
    print(f"loading {args.model} ({args.dtype}) on {device} ...", file=sys.stderr)
    model, _ = load_model(args.model, DTYPES[args.dtype], device)
    optimized = None
    if keeps_stored_weights(args):
        import xpu_coopt

        optimized, _ = xpu_coopt.from_pretrained(
            args.model, dtype=DTYPES[args.dtype], device=device, kv_dtype=args.kv_dtype, backend=args.backend,
            kv_cache=args.kv_cache, cuda_graph=CUDA_GRAPH_CHOICES[args.cuda_graph],
            pack_shared_weights=args.pack_shared_weights, weight_dtype=args.weight_dtype,
            group_size=args.group_size, tensor_parallel=args.tensor_parallel,
        )  # fmt: skip
    result = benchmark(
        model, dtype=DTYPES[args.dtype], batch_size=args.batch_size, input_tokens=args.input_tokens,
        output_tokens=args.output_tokens, num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences, kv_dtype=args.kv_dtype, kv_cache=args.kv_cache,
        min_input_tokens=args.min_input_tokens,
        backend=args.backend, repeats=args.repeats,
        cuda_graph=CUDA_GRAPH_CHOICES[args.cuda_graph],
        pack_shared_weights=args.pack_shared_weights, keep_decode_graph=args.keep_decode_graph,
        weight_dtype=args.weight_dtype, group_size=args.group_size, optimized=optimized,
        tensor_parallel=args.tensor_parallel,
    )  # fmt: skip
    result.settings["model"] = args.model
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result.to_dict(), handle, indent=2)
    return 0


def generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from prompts with an optimized model",
        description="Optimizes the model and runs its generate() on the prompts (several: one left-padded "
        "batch) or on a chat read from stdin. One sequence is streamed as it is generated; timings go to stderr. "
        "Generation settings not given come from the model's generation_config, as in transformers.",
    )
    model_with_tokenizer_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], type=typed_text,
                        help="a prompt (repeat for a batch)")  # fmt: skip
    parser.add_argument("--prompt-file", action="append", default=[], type=existing_file,
                        help="a file whose whole text is one prompt (repeatable)")  # fmt: skip
    parser.add_argument("--chat", action="store_true",
                        help="each prompt as a user turn of the tokenizer's chat template; prints the reply only")  # fmt: skip
    parser.add_argument("--interactive", action="store_true",
                        help="a chat read from stdin, one line a turn (the chat template over the whole conversation)")  # fmt: skip
    runtime_arguments(parser)
    parser.add_argument("--max-new-tokens", type=positive, default=64)
    parser.add_argument("--num-beams", type=positive)
    parser.add_argument("--num-return-sequences", type=positive)
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int, help="seed torch's random draws before generating (sampling)")
    parser.add_argument("--prompt-lookup-num-tokens", type=positive, metavar="N",
                        help="prompt lookup decoding: up to N drafts a step, looked up in the sequence")  # fmt: skip
    cache_arguments(parser)
    parser.add_argument(
        "--kv-scales", help="a scales file or model folder from calibrate-kv (FP8 --kv-dtype)"
    )
    weight_arguments(parser, "--weight-dtype", "auto (default: as stored; a .gguf's quantized projections and a "
                     "GPTQ/AWQ folder's stay so), int4 or int8 (round-to-nearest projections of a 16-bit "
                     "model, quantized while loading a .gguf or folder)")  # fmt: skip
    parser.add_argument("--compare", action="store_true",
                        help="also run transformers' generate on the same prompts and settings (and seed) and "
                        "report whether its tokens are the same; exit status 1 where they are not")  # fmt: skip
    tensor_parallel_argument(parser, "generate", "rank 0 prints")


GENERATION_ARGUMENTS = ("max_new_tokens", "num_beams", "num_return_sequences", "do_sample", "temperature",
                        "top_k", "top_p", "repetition_penalty", "prompt_lookup_num_tokens")  # fmt: skip


def run_generate(args: argparse.Namespace) -> int:
    from xpu_coopt.cli.prompts import encode_prompts, require_chat_template
    from xpu_coopt.cli.text_generation import chat, first_difference, generate_and_print, why_tokens_can_part

    prompts = args.prompt + [read_text(path) for path in args.prompt_file]
    if args.interactive and (prompts or args.compare):
        raise ValueError(
            "--interactive reads its turns from stdin: it takes no --prompt, --prompt-file or --compare"
        )
    if not prompts and not args.interactive:
        raise ValueError("no prompt: pass --prompt TEXT or --prompt-file FILE, or --interactive")
    if args.tensor_parallel > 1:
        if args.interactive or args.compare:
            raise ValueError("--tensor-parallel takes no --interactive or --compare")
        join_ranks(args, "generate")
    model, tokenizer, transformers_model = optimized_with_tokenizer(args)
    if args.interactive:  # before stdin is read
        require_chat_template(tokenizer)
    if prompts:
        input_ids, attention_mask = encode_prompts(tokenizer, prompts, args.chat)
        input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)
    settings = {name: getattr(args, name) for name in GENERATION_ARGUMENTS if getattr(args, name) is not None}
    # With --compare both sides draw from one seed, so that sampled tokens can be compared too.
    seed = args.seed if args.seed is not None or not args.compare else torch.seed()
    if seed is not None:
        torch.manual_seed(seed)
    if args.interactive:
        chat(model, tokenizer, settings, stdin_turns(), sys.stdout, args.device)
        return 0
    ours = generate_and_print(model, tokenizer, prompts, input_ids, attention_mask, settings,
                              echo_prompts=not args.chat, out=sys.stdout)  # fmt: skip
    if not args.compare:
        return 0
    torch.manual_seed(seed)
    start = time.perf_counter()
    theirs = transformers_model().generate(input_ids, attention_mask=attention_mask, **settings)
    print(f"transformers: {time.perf_counter() - start:.2f} s", file=sys.stderr)
    prompt_len = input_ids.shape[1]
    difference = first_difference(ours.sequences[:, prompt_len:], theirs[:, prompt_len:])
    if difference is None:
        print("transformers generated the same tokens", file=sys.stderr)
        return 0
    row, position = difference
    print(f"transformers' sequence {row + 1} parts from xpu_coopt's at new token {position + 1}: "
          f"{why_tokens_can_part(DTYPES[args.dtype], args.kv_dtype)}", file=sys.stderr)  # fmt: skip
    return 1


def optimized_with_tokenizer(args: argparse.Namespace) -> tuple[Any, Any, Callable[[], Any]]:
    """(optimized model, tokenizer, a function returning transformers' model of the same checkpoint). A
    .gguf file or a GPTQ/AWQ folder with --weight-dtype auto keeps its quantized projections, int4/int8
    quantize a .gguf or folder while loading (xpu_coopt.from_pretrained); then transformers' model is
    loaded only when asked for (--compare)."""
    import xpu_coopt
    from xpu_coopt.checkpoints import load_model

    options = dict(kv_cache=args.kv_cache, kv_dtype=args.kv_dtype, backend=args.backend, kv_scales=args.kv_scales,
                   cuda_graph=CUDA_GRAPH_CHOICES[args.cuda_graph],
                   tensor_parallel=getattr(args, "tensor_parallel", 1))  # fmt: skip
    path = Path(args.model)
    if keeps_stored_weights(args):
        check_runnable(args)
        dtype = DTYPES[args.dtype]
        model, tokenizer = xpu_coopt.from_pretrained(
            path,
            dtype=dtype,
            device=args.device,
            weight_dtype=args.weight_dtype,
            group_size=args.group_size,
            **options,
        )
        if tokenizer is None:
            raise ValueError(f"{path} comes without a tokenizer")
        return model, tokenizer, lambda: load_model(args.model, dtype, args.device)[0]
    hf_model, tokenizer = load_with_tokenizer(args)
    model = xpu_coopt.optimize(hf_model, dtype=DTYPES[args.dtype], weight_dtype=args.weight_dtype,
                               group_size=args.group_size, **options)  # fmt: skip
    return model, tokenizer, lambda: hf_model


def stdin_turns() -> Iterator[str]:
    """The lines of stdin (bytes that are not UTF-8 as U+FFFD), each asked for with a "> " prompt on a
    terminal, up to its end (Ctrl-D) or a Ctrl-C at the prompt."""
    terminal = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    if terminal:
        print(
            "a chat: one line a turn; Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at the prompt) ends it",
            file=sys.stderr,
        )
    while True:
        try:
            yield typed_text(input("> " if terminal else ""))
        except (EOFError, KeyboardInterrupt):
            return


def eval_ppl_parser(subparsers) -> None:
    from xpu_coopt.ops import KV_DTYPES

    parser = subparsers.add_parser(
        "eval-ppl",
        help="perplexity of transformers and of xpu_coopt with each KV cache format, on one text",
        description="Chunked perplexity over non-overlapping windows of --context tokens (stride = context). "
        "transformers scores each window in one forward pass; xpu_coopt prefills its first token and decodes "
        "the rest token by token, so attention reads every earlier K/V back from the (possibly FP8) cache.",
    )
    model_arguments(parser, "the text file to score (e.g. wikitext-2's test split)")
    parser.add_argument("--max-tokens", type=positive, default=10240,
                        help="tokens of the text to score, from its start (default 10240)")  # fmt: skip
    parser.add_argument("--kv-dtypes", default=",".join(KV_DTYPES),
                        help=f"comma-separated cache formats to evaluate (default {','.join(KV_DTYPES)})")  # fmt: skip
    parser.add_argument("--kv-scales", default="calibrate",
                        help="per-tensor static FP8 scales, also evaluated: 'calibrate' (default: on the "
                        "--calibration-tokens tokens that follow the scored ones), 'none', or a saved scales "
                        "file or model folder")  # fmt: skip
    parser.add_argument("--calibration-tokens", type=positive, default=4096)
    weight_arguments(parser, "--weight-dtypes", "comma-separated projection formats to evaluate, each with "
                     "every --kv-dtypes (default auto: as the model holds them; int4, int8: round-to-nearest)")  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


def calibrate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate-kv",
        help="calibrate per-tensor static FP8 KV scales on a text and save them",
        description="Measures each layer's largest |K| (after RoPE) and |V| over windows of a text and "
        "saves them as xpu_coopt_kv_scales.json; optimize(..., kv_scales=PATH) loads them.",
    )
    model_arguments(parser, "the calibration text")
    parser.add_argument("--max-tokens", type=positive, default=8192, help="calibration tokens (default 8192)")
    parser.add_argument("--out", help="a folder or .json file (default: the model's folder)")


def convert_gqa_parser(subparsers) -> None:
    from xpu_coopt.checkpoints import DEFAULT_MODEL
    from xpu_coopt.gqa import GROUPINGS

    parser = subparsers.add_parser(
        "convert-gqa",
        help="restructure attention into grouped-query attention with fewer K/V heads (Opt-GQA)",
        description="Mean-pools groups of K/V projection heads (Ainslie et al., 2023) and writes a checkpoint "
        "transformers loads (save_pretrained). --grouping similarity pools the heads closest on a calibration text.",
    )
    parser.add_argument(
        "model", help=f"'{DEFAULT_MODEL}', a local HF folder, a .gguf or a llama2.c .bin file"
    )
    parser.add_argument("out", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--kv-heads", type=positive, required=True, help="K/V heads after conversion")
    parser.add_argument("--grouping", default="mean", choices=GROUPINGS)
    parser.add_argument("--calibration-text", type=existing_file, help="text for --grouping similarity")
    parser.add_argument("--calibration-tokens", type=positive, default=4096)
    parser.add_argument("--context", type=positive, default=256, help="tokens per calibration window")
    parser.add_argument(
        "--tokenizer", type=existing_file, help="a llama2.c tokenizer .bin, for a llama2.c model"
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def run_convert_gqa(args: argparse.Namespace) -> int:
    from xpu_coopt.checkpoints import Llama2cTokenizer, load_model
    from xpu_coopt.cli.perplexity import token_windows, tokenize
    from xpu_coopt.gqa import convert_to_gqa

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new folder")
    model, tokenizer = load_model(args.model, DTYPES[args.dtype])
    llama2c_tokenizer = Llama2cTokenizer(args.tokenizer) if args.tokenizer else None
    calibration = None
    if args.grouping == "similarity":
        if not args.calibration_text:
            raise ValueError("--grouping similarity needs --calibration-text")
        if (llama2c_tokenizer or tokenizer) is None:
            raise ValueError(f"{args.model} comes without a tokenizer: pass --tokenizer")
        ids = tokenize(
            llama2c_tokenizer or tokenizer, read_text(args.calibration_text), args.calibration_tokens
        )
        calibration = token_windows(ids, args.context)
    converted = convert_to_gqa(model, args.kv_heads, args.grouping, calibration)
    converted.save_pretrained(out)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    print(f"wrote {out}: {args.kv_heads} K/V heads ({args.grouping} grouping)")
    return 0


def run_eval_ppl(args: argparse.Namespace) -> int:
    import xpu_coopt
    from xpu_coopt.cli.perplexity import evaluate, format_table, token_windows, tokenize
    from xpu_coopt.kv_scales import KVScales, calibrate_kv_scales

    kv_dtypes = [name.strip() for name in args.kv_dtypes.split(",") if name.strip()]
    hf_model, tokenizer = load_with_tokenizer(args)
    text = read_text(args.text)
    wanted = args.max_tokens + (args.calibration_tokens if args.kv_scales == "calibrate" else 0)
    ids = tokenize(tokenizer, text, wanted)
    windows = token_windows(ids, args.context, args.max_tokens)
    models = [
        xpu_coopt.optimize(
            hf_model,
            dtype=DTYPES[args.dtype],
            kv_dtype=kv_dtype,
            backend=args.backend,
            weight_dtype=weight_dtype,
            group_size=args.group_size,
        )
        for weight_dtype in args.weight_dtypes.split(",")
        for kv_dtype in kv_dtypes
    ]
    fp8_dtypes = [kv_dtype for kv_dtype in kv_dtypes if kv_dtype != "auto"]
    scales = None
    if args.kv_scales == "calibrate" and fp8_dtypes:
        calibration = token_windows(ids[windows.numel() :], args.context)
        scales = calibrate_kv_scales(
            models[0],
            calibration,
            args.batch_size,
            f"{args.text}: {calibration.numel()} tokens after the scored ones",
        )
    elif args.kv_scales != "none" and fp8_dtypes:
        scales = KVScales.load(args.kv_scales)
    if scales is not None:
        models += [
            xpu_coopt.optimize(
                hf_model, dtype=DTYPES[args.dtype], kv_dtype=kv_dtype, backend=args.backend, kv_scales=scales
            )
            for kv_dtype in fp8_dtypes
        ]
    print(f"scoring {windows.shape[0]} windows of {args.context} tokens "
          f"({windows.shape[0] * (args.context - 1)} scored tokens)", file=sys.stderr)  # fmt: skip
    results = evaluate(
        hf_model, models, windows, args.batch_size, log=lambda line: print(line, file=sys.stderr)
    )
    print(format_table(results))
    if args.json:
        settings = {key: value for key, value in vars(args).items() if key != "json"}
        settings["device"] = str(args.device)
        settings["scored_tokens"] = results[0].tokens
        payload = {"settings": settings, "results": [r.to_dict() for r in results]}
        if scales is not None:
            payload["kv_scales"] = {"key_amax": scales.key_amax, "value_amax": scales.value_amax,
                                    "calibration": scales.calibration}  # fmt: skip
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    import xpu_coopt
    from xpu_coopt.cli.perplexity import token_windows, tokenize
    from xpu_coopt.kv_scales import calibrate_kv_scales

    out = args.out or (args.model if Path(args.model).is_dir() else None)
    if out is None:
        raise ValueError(f"{args.model} is not a model folder: pass --out (a folder or .json file)")
    hf_model, tokenizer = load_with_tokenizer(args)
    windows = token_windows(tokenize(tokenizer, read_text(args.text), args.max_tokens), args.context)
    model = xpu_coopt.optimize(hf_model, dtype=DTYPES[args.dtype], backend=args.backend)
    scales = calibrate_kv_scales(model, windows, args.batch_size, f"{args.text}: {windows.numel()} tokens")
    print(f"wrote {scales.save(out)}")
    return 0


# Each command's parser and run, in the order `xpu-coopt --help` lists them.
COMMANDS = {
    "bench": (bench_parser, run_bench),
    "eval-ppl": (eval_ppl_parser, run_eval_ppl),
    "calibrate-kv": (calibrate_parser, run_calibrate),
    "convert-gqa": (convert_gqa_parser, run_convert_gqa),
    "generate": (generate_parser, run_generate),
    "serve": (serve_parser, run_serve),
}
