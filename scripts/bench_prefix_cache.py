"""A conversation's turns with and without a PrefixCache, beside transformers with and without a DynamicCache.

Each turn's prompt is the last turn's whole output followed by --turn-tokens new random tokens (the first
turn: --input-tokens); each generates --output-tokens greedily (EOS suppressed). Four sides run the same
conversation in one process, turn by turn: xpu_coopt prefilling every prompt whole, xpu_coopt with a
PrefixCache, transformers prefilling every prompt whole, transformers with one DynamicCache passed to every
turn (its idiom for reusing a conversation's K/V). Prints, per side, each turn's time to the first token
(the prefill) and whole turn in ms, the best of --repeats conversations; and checks that every side
generated the same tokens (float32: they must; 16-bit dtypes may part where tokens are nearly tied).

    python scripts/bench_prefix_cache.py                          # SmolLM2-135M (embedded), CPU, bfloat16
    python scripts/bench_prefix_cache.py --model llama-2-7b --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from transformers import DynamicCache, LogitsProcessorList

import xpu_coopt
from xpu_coopt.checkpoints import DEFAULT_MODEL, load_model
from xpu_coopt.cli import DTYPES
from xpu_coopt.cli.bench import StepClock, random_prompts, synchronize


def _conversation(generate, first_prompt, turn_prompts, device) -> tuple[list[tuple[float, float]], list]:
    """Runs the turns; generate(prompt) -> (output ids, first-token time). Returns each turn's (first-token
    ms, turn ms) and outputs."""
    timings, outputs, output = [], [], None
    for turn, new_tokens in enumerate([None, *turn_prompts]):
        prompt = first_prompt if turn == 0 else torch.cat((output, new_tokens), dim=1)
        synchronize(device)
        start = time.perf_counter()
        output, first_token = generate(prompt)
        synchronize(device)
        timings.append(((first_token - start) * 1e3, (time.perf_counter() - start) * 1e3))
        outputs.append(output)
    return timings, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--input-tokens", type=int, default=512)
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-dtype", default="auto")
    args = parser.parse_args()
    # transformers 5.24 renamed generate()'s past_key_values to cache; the old name, which every release
    # in xpu_coopt's range takes, warns there.
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    hf_model, _ = load_model(args.model, dtype, device)
    optimized = xpu_coopt.optimize(hf_model, kv_dtype=args.kv_dtype)
    vocab = hf_model.config.vocab_size
    first_prompt = random_prompts(vocab, 1, args.input_tokens)[0].to(device)
    turn_prompts = [
        random_prompts(vocab, 1, args.turn_tokens, seed=turn)[0].to(device) for turn in range(1, args.turns)
    ]
    # EOS (id 2) suppressed until the last token, as in xpu-coopt bench: every turn generates the same count.
    settings = dict(max_new_tokens=args.output_tokens, min_new_tokens=args.output_tokens, do_sample=False,
                    eos_token_id=2, pad_token_id=0)  # fmt: skip

    def ours(prefix_cache):
        def generate(prompt):
            output = optimized.generate(
                prompt, past_key_values=prefix_cache, return_dict_in_generate=True, **settings
            )
            return output.sequences, output.step_times[0]

        return generate

    def theirs(dynamic_cache):
        def generate(prompt):
            clock = StepClock(device)
            output = hf_model.generate(prompt, past_key_values=dynamic_cache,
                                       logits_processor=LogitsProcessorList([clock]), **settings)  # fmt: skip
            return output, clock.times[0]

        return generate

    prefix_caches = []  # each xpu_coopt PrefixCache conversation's

    def with_prefix_cache():
        prefix_caches.append(xpu_coopt.PrefixCache())
        return ours(prefix_caches[-1])

    sides = {
        "xpu_coopt, whole prompts": lambda: ours(None),
        "xpu_coopt, PrefixCache": with_prefix_cache,
        "transformers, whole prompts": lambda: theirs(None),
        "transformers, DynamicCache": lambda: theirs(DynamicCache(config=hf_model.config)),
    }
    print(f"{args.model} {args.dtype} on {device}, kv_dtype {args.kv_dtype}: first prompt {args.input_tokens} "
          f"tokens, then {args.turn_tokens} new tokens a turn, {args.output_tokens} generated a turn, "
          f"{args.turns} turns; best of {args.repeats}")  # fmt: skip
    print("side | first token ms by turn | turn ms by turn")
    outputs = {}
    with torch.inference_mode():
        for name, make in sides.items():
            best = None
            for _ in range(args.repeats):
                timings, outputs[name] = _conversation(make(), first_prompt, turn_prompts, device)
                if best is not None:
                    timings = [(min(a[0], b[0]), min(a[1], b[1])) for a, b in zip(best, timings, strict=True)]
                best = timings
            firsts = " ".join(f"{first:.1f}" for first, _ in best)
            turns = " ".join(f"{whole:.1f}" for _, whole in best)
            print(f"{name} | {firsts} | {turns}")
    held = prefix_caches[-1]
    print(f"PrefixCache after the last turn: {len(held)} tokens, {held.nbytes() / 2**20:.2f} MiB of K/V")
    reference = outputs["transformers, whole prompts"]
    for name, side in outputs.items():
        same = all(torch.equal(a, b) for a, b in zip(side, reference, strict=True))
        print(f"{name}: {'the same tokens as' if same else 'tokens part from'} transformers' whole prompts")


if __name__ == "__main__":
    main()
