"""Greedy generation with and without prompt lookup decoding, xpu_coopt beside transformers.

An input-grounded task, where prompt lookup pays: the model is asked, through its chat template, to repeat
a passage of --text (default: prompt_lookup_passage.txt beside this script, the opening of an earlier
README.md, which the recorded runs used; from --skip-chars on, --passage-chars long)
with its mistakes corrected, so its reply quotes the passage. Four sides generate up to --output-tokens
greedily (stopping at EOS) in one process: xpu_coopt and transformers, each plain and with
prompt_lookup_num_tokens=--drafts. Prints each side's wall time for the whole generate() (best of
--repeats), tokens generated, tokens per second, the xpu_coopt prompt lookup's decode steps and drafts
kept, and whether each side generated transformers' greedy tokens (float32: they must; a 16-bit dtype may
part where tokens are nearly tied, as a step of several tokens rounds differently from one of one).

    python scripts/bench_prompt_lookup.py                          # SmolLM2-135M (embedded), CPU, bfloat16
    python scripts/bench_prompt_lookup.py --dtype float32
    python scripts/bench_prompt_lookup.py --pack-shared-weights    # o_proj, down_proj, LM head packed too
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import xpu_coopt
from xpu_coopt.checkpoints import DEFAULT_MODEL, load_model
from xpu_coopt.cli import DTYPES
from xpu_coopt.cli.bench import synchronize

PASSAGE = Path(__file__).resolve().parent / "prompt_lookup_passage.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--text", type=Path, default=PASSAGE)
    parser.add_argument("--skip-chars", type=int, default=0)
    parser.add_argument("--passage-chars", type=int, default=1200)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--drafts", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--pack-shared-weights", action="store_true", help="optimize(pack_shared_weights=True)"
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    hf_model, tokenizer = load_model(args.model, dtype, device)
    if tokenizer is None or tokenizer.chat_template is None:
        raise SystemExit(f"{args.model} has no tokenizer with a chat template: the task is a chat request")
    optimized = xpu_coopt.optimize(hf_model, pack_shared_weights=args.pack_shared_weights)
    passage = args.text.read_text()[args.skip_chars : args.skip_chars + args.passage_chars]
    request = f"Repeat the following text, correcting any spelling mistakes:\n\n{passage}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": request}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"].to(device)
    settings = dict(max_new_tokens=args.output_tokens, do_sample=False)
    lookup = dict(prompt_lookup_num_tokens=args.drafts)
    sides = {
        "transformers": lambda: hf_model.generate(prompt, **settings),
        "transformers, prompt lookup": lambda: hf_model.generate(prompt, **settings, **lookup),
        "xpu_coopt": lambda: optimized.generate(prompt, **settings),
        "xpu_coopt, prompt lookup": lambda: optimized.generate(
            prompt, return_dict_in_generate=True, **settings, **lookup
        ),
    }
    print(f"{args.model} {args.dtype} on {device}: a {prompt.shape[1]}-token prompt, up to {args.output_tokens} "
          f"new tokens, {args.drafts} drafts a step; best of {args.repeats}")  # fmt: skip
    outputs, times = {}, {}
    with torch.inference_mode():
        for name, run in sides.items():
            for _ in range(args.repeats):
                synchronize(device)
                start = time.perf_counter()
                outputs[name] = run()
                synchronize(device)
                times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
    lookup_output = outputs["xpu_coopt, prompt lookup"]
    outputs["xpu_coopt, prompt lookup"] = lookup_output.sequences
    reference = outputs["transformers"]
    print("side | ms | tokens | tokens/s | against transformers' greedy tokens")
    for name, sequences in outputs.items():
        new = sequences.shape[1] - prompt.shape[1]
        same = torch.equal(sequences, reference)
        print(
            f"{name} | {times[name] * 1e3:.0f} | {new} | {new / times[name]:.1f} | {'the same' if same else 'part'}"
        )
    print(f"xpu_coopt, prompt lookup: {lookup_output.decode_steps} decode steps after the prefill, "
          f"{lookup_output.accepted_drafts} drafts kept")  # fmt: skip
    print(f"reply: {tokenizer.decode(reference[0, prompt.shape[1] :])[:300]!r}")


if __name__ == "__main__":
    main()
