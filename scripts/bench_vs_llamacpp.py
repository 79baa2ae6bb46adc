"""Decode speed of xpu_coopt against llama.cpp on the same GGUF file, threads and context, alternating.

    python scripts/bench_vs_llamacpp.py [--gguf FILE] [--llama DEST/llama] [--context 1024] [--rounds 3]

Each round runs, one after the other: llama.cpp's llama-bench (tg at depth --context) on the GGUF as
stored and on its BF16 copy (llama-quantize --allow-requantize FILE COPY BF16, made once in a temporary
folder), xpu_coopt.from_pretrained(GGUF) with its 4-bit projections kept 4-bit (bfloat16 activations),
and xpu_coopt on the same model dequantized to bfloat16 by transformers (the 16-bit path). The ratios
compare each xpu_coopt side with llama.cpp on the same weights. xpu_coopt's
rate: the mean next-token latency of one generation of --new-tokens after a random prompt of --context
tokens, EOS suppressed. Prints one line a round and the ratios of the medians.
--llama: the wrapper ../shared/toolchains/llama.cpp/setup.sh DEST writes (default: unpacked into a
temporary folder from ../shared/toolchains/llama.cpp, where it exists).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

import xpu_coopt
from xpu_coopt.checkpoints import load_smollm2, smollm2_location

TOOLCHAIN = Path(__file__).resolve().parents[2] / "shared" / "toolchains" / "llama.cpp"


def llama_wrapper(given: str | None) -> str:
    if given:
        return given
    if not (TOOLCHAIN / "setup.sh").exists():
        raise SystemExit(
            f"no llama.cpp tools: pass --llama (the wrapper setup.sh writes); {TOOLCHAIN} is absent"
        )
    dest = Path(tempfile.gettempdir()) / "xpu_coopt-llama.cpp"
    return subprocess.run(["bash", str(TOOLCHAIN / "setup.sh"), str(dest)], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def llama_cpp_rate(llama: str, gguf: Path, threads: int, context: int, new_tokens: int) -> float:
    """llama-bench's tokens/s generating new_tokens after context tokens."""
    command = [llama, "llama-bench", "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(new_tokens),
               "-d", str(context), "-r", "2", "-o", "json"]  # fmt: skip
    rows = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return float(rows[0]["avg_ts"])


def bf16_copy(llama: str, gguf: Path) -> Path:
    """llama.cpp's BF16 copy of the GGUF (the same values in 16 bits), made once a process."""
    copy = Path(tempfile.mkdtemp(prefix="xpu_coopt-bench-")) / f"{gguf.stem}-BF16.gguf"
    subprocess.run([llama, "llama-quantize", "--allow-requantize", str(gguf), str(copy), "BF16"], check=True,
                   capture_output=True)  # fmt: skip
    return copy


def xpu_coopt_rate(model, context: int, new_tokens: int, vocab: int) -> float:
    """tokens/s of one generation's decode steps (its first token, the prefill, left out)."""
    ids = torch.randint(3, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True)  # fmt: skip
    steps = out.step_times
    return (len(steps) - 1) / (steps[-1] - steps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="default: the embedded SmolLM2-135M Q4_1")
    parser.add_argument("--llama", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf = args.gguf or Path(*smollm2_location())
    llama = llama_wrapper(args.llama)
    int4, tokenizer = xpu_coopt.from_pretrained(gguf, dtype=torch.bfloat16)
    if args.gguf is None:
        bf16 = xpu_coopt.optimize(load_smollm2(torch.bfloat16)[0])
    else:
        from xpu_coopt.checkpoints import load_gguf

        bf16 = xpu_coopt.optimize(load_gguf(gguf.parent, gguf.name, torch.bfloat16)[0])
    vocab = len(tokenizer)
    copy = bf16_copy(llama, gguf)
    rates: dict[str, list[float]] = {
        "llama.cpp": [], "llama.cpp BF16": [], "xpu_coopt int4": [], "xpu_coopt bf16": []
    }  # fmt: skip
    for round_ in range(args.rounds):
        rates["llama.cpp"].append(llama_cpp_rate(llama, gguf, args.threads, args.context, args.new_tokens))
        rates["llama.cpp BF16"].append(
            llama_cpp_rate(llama, copy, args.threads, args.context, args.new_tokens)
        )
        rates["xpu_coopt int4"].append(xpu_coopt_rate(int4, args.context, args.new_tokens, vocab))
        rates["xpu_coopt bf16"].append(xpu_coopt_rate(bf16, args.context, args.new_tokens, vocab))
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{name} {values[-1]:.1f} tok/s" for name, values in rates.items())
        )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{gguf.name}, {args.threads} threads, {args.new_tokens} tokens after {args.context}: medians "
          + ", ".join(f"{name} {value:.1f} tok/s" for name, value in medians.items()))  # fmt: skip
    print(f"ratios: int4 / llama.cpp {medians['xpu_coopt int4'] / medians['llama.cpp']:.2f}x, "
          f"bf16 / llama.cpp BF16 {medians['xpu_coopt bf16'] / medians['llama.cpp BF16']:.2f}x; "
          f"int4 / bf16 {medians['xpu_coopt int4'] / medians['xpu_coopt bf16']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
