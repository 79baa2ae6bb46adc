"""Where generate() makes the host wait for the GPU (run by hand on a CUDA machine): every synchronizing call
during one generation, counted by its place in xpu_coopt, via torch.cuda.set_sync_debug_mode("warn").

Only the prompt checks and the final trim should show: the one wait per step, for the stop flags, is on an
event, which this mode does not report. Any other wait lets the GPU idle while the host issues work.

    python scripts/find_device_waits.py [--model llama-2-7b] [--num-beams 4] [--output-tokens 8]
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch

import xpu_coopt
from xpu_coopt.checkpoints import load_model
from xpu_coopt.cli.bench import _generate_kwargs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=8)
    args = parser.parse_args()
    hf_model, _ = load_model(args.model, torch.float16, "cuda")
    model = xpu_coopt.optimize(hf_model)
    ids = torch.randint(3, model.spec.vocab_size, (1, args.input_tokens), device="cuda")
    settings = dict(num_beams=args.num_beams, eos_token_id=2, pad_token_id=0)
    kwargs = _generate_kwargs(settings, args.output_tokens)
    model.generate(ids, **kwargs)  # warm-up: Triton compilation, allocator

    waits: collections.Counter[str] = collections.Counter()

    def record(*_args, **_kwargs) -> None:
        frames = [f for f in traceback.extract_stack() if "xpu_coopt" in f.filename]
        waits[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}" for f in frames[::-1][:2])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model.generate(ids, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print(f"{sum(waits.values())} waits over {args.output_tokens} tokens, num_beams={args.num_beams}:")
    for place, count in waits.most_common():
        print(f"{count:4d}  {place}")


if __name__ == "__main__":
    main()
