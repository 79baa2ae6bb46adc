"""xpu_coopt's next-token latency alone (no transformers run beside it), for A/B runs across commits.

Times the checkout it is imported from, so two commits can alternate in fresh processes on a noisy
machine, e.g. with two git worktrees:

    for i in 1 2; do for tree in OLD NEW; do PYTHONPATH=$tree python scripts/step_time.py --label $tree; done; done

Prints one line: the label, batch size, beams, each generation's mean next-token latency (ms) and their minimum.
SmolLM2-135M (the embedded model) in bfloat16 on the CPU, --batch-size random prompts of --input-tokens
(with --min-input-tokens, of lengths spread from it to --input-tokens, left-padded), EOS suppressed.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

import xpu_coopt
from xpu_coopt.checkpoints import DEFAULT_MODEL, load_model
from xpu_coopt.cli.bench import random_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--min-input-tokens", type=int, default=None)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache", default=None, help="optimize(kv_cache=...) (default: optimize()'s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(DEFAULT_MODEL, torch.bfloat16, "cpu")
    options = {} if args.kv_cache is None else {"kv_cache": args.kv_cache}
    optimized = xpu_coopt.optimize(model, dtype=torch.bfloat16, **options)
    ids, mask = random_prompts(
        optimized.spec.vocab_size, args.batch_size, args.input_tokens, args.min_input_tokens
    )

    def generate(tokens: int) -> list[float]:
        out = optimized.generate(
            ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
            num_beams=args.num_beams, do_sample=False, eos_token_id=2, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
        return out.step_times

    generate(2)  # warm-up
    means = []
    for _ in range(args.repeats):
        times = generate(args.output_tokens)
        means.append(statistics.fmean(b - a for a, b in itertools.pairwise(times)) * 1e3)
    print(
        args.label,
        args.batch_size,
        args.num_beams,
        " ".join(f"{m:.2f}" for m in means),
        "min",
        f"{min(means):.2f}",
    )


if __name__ == "__main__":
    main()
