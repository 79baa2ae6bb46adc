"""`xpu-coopt generate`'s work: an optimized model's generate() on text prompts or a chat read line by line,
its text printed (streamed where there is one sequence), its timing, and its tokens set against
transformers'."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import torch

from xpu_coopt.cache.prefix_cache import PrefixCache
from xpu_coopt.cli.bench import summarise_steps
from xpu_coopt.cli.prompts import TextStream, chat_ids, completion_text
from xpu_coopt.generation import GenerateOutput
from xpu_coopt.generation.settings import resolve_settings


def generate_and_print(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: dict[str, Any],
    echo_prompts: bool,
    out: TextIO,
    prefix_cache: PrefixCache | None = None,
) -> GenerateOutput:
    """Runs model.generate() on the batch (the prompts' ids, left-padded) and prints its text: a single
    sequence streamed as its tokens come, several each under `[prompt i, sequence j]`; echo_prompts: each
    prompt's text before its sequence. Its timing goes to stderr. prefix_cache: generate()'s
    past_key_values (one prompt)."""
    resolved = resolve_settings(model, input_ids.shape[1], settings)  # with the model's generation_config
    streamer = None
    if len(prompts) == 1 and resolved.num_beams == 1 and resolved.num_return_sequences == 1:
        streamer = TextStream(tokenizer, out)
        if echo_prompts:
            out.write(prompts[0])
            out.flush()
    start = time.perf_counter()
    output = model.generate(input_ids, attention_mask=attention_mask, streamer=streamer,
                            past_key_values=prefix_cache, return_dict_in_generate=True, **settings)  # fmt: skip
    seconds = time.perf_counter() - start
    if streamer is None:
        per_prompt = output.sequences.shape[0] // len(prompts)
        for row, sequence in enumerate(output.sequences.tolist()):
            prompt = row // per_prompt
            print(f"[prompt {prompt + 1}, sequence {row % per_prompt + 1}]", file=out)
            text = new_text(tokenizer, input_ids[prompt], attention_mask[prompt], sequence)
            print((prompts[prompt] if echo_prompts else "") + text, file=out)
    timing = generation_timing(start, output, seconds)
    if prefix_cache is not None:
        timing += f", {prefix_cache.reused_tokens} of {input_ids.shape[1]} prompt tokens reused"
    print(timing, file=sys.stderr)
    return output


def new_text(
    tokenizer: Any, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, sequence: list[int]
) -> str:
    """The text a generated sequence adds after its (left-padded) prompt."""
    context = prompt_ids[attention_mask.bool()].tolist()
    return completion_text(tokenizer, context, sequence[prompt_ids.shape[0] :])


def chat(
    model: Any,
    tokenizer: Any,
    settings: dict[str, Any],
    lines: Iterable[str],
    out: TextIO,
    device: torch.device,
) -> None:
    """A conversation: each non-empty line is the user's next turn, answered after the whole conversation so
    far (the chat template over every earlier turn, the replies as printed); ends with the lines. The
    conversation's K/V are kept from turn to turn (a PrefixCache): each turn prefills only what the last
    generation did not run, from where the templated conversation departs from its tokens. Ctrl-C during a
    reply stops it and leaves its turn out; the conversation goes on."""
    messages: list[dict[str, str]] = []
    prefix_cache = PrefixCache()
    for line in lines:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        input_ids = torch.tensor([chat_ids(tokenizer, messages)], device=device)
        attention_mask = torch.ones_like(input_ids)
        try:
            output = generate_and_print(
                model, tokenizer, [line], input_ids, attention_mask, settings, False, out, prefix_cache
            )
        except KeyboardInterrupt:
            # Ctrl-C stops this reply only: the turn is left out, and the K/V held are let go (the
            # interrupted generation may have been updating them).
            out.write("\n")
            out.flush()
            print("[reply stopped: that turn is left out of the conversation]", file=sys.stderr)
            messages.pop()
            prefix_cache = PrefixCache()
            continue
        reply = new_text(tokenizer, input_ids[0], attention_mask[0], output.sequences[0].tolist())
        messages.append({"role": "assistant", "content": reply})


def generation_timing(start: float, output: GenerateOutput, seconds: float) -> str:
    """One line: sequences, steps, first-token latency, mean next-token latency, tokens per second, KV bytes."""
    steps, rows = len(output.step_times), output.sequences.shape[0]
    run = summarise_steps(start, output.step_times, steps * rows, output.kv_cache_bytes)
    line = (
        f"{rows} sequence{'s' if rows > 1 else ''}, {steps} steps in {seconds:.2f} s: "
        f"first token {run.first_token_ms:.1f} ms"
    )
    if steps > 1:  # a decode step's rate, the prefill left out
        next_ms = run.next_token_ms_mean
        line += f", next token {next_ms:.1f} ms ({rows * 1e3 / next_ms:.1f} tokens/s)"
    if output.decode_steps:  # prompt lookup: several tokens a step
        line += f", prompt lookup: {output.accepted_drafts} drafts kept in {output.decode_steps} decode steps"
    return line + f", KV cache {run.kv_cache_bytes / 2**20:.2f} MiB"


def first_difference(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[int, int] | None:
    """(row, position) of the first new token where two generations [rows, new tokens] differ, None where
    they are equal. A generation that stopped earlier differs where the other one goes on."""
    if ours.shape[0] != theirs.shape[0]:
        raise ValueError(f"{ours.shape[0]} sequences against {theirs.shape[0]}: not the same generation")
    length = max(ours.shape[1], theirs.shape[1])
    ours, theirs = (
        torch.nn.functional.pad(x.cpu(), (0, length - x.shape[1]), value=-1) for x in (ours, theirs)
    )
    unequal = (ours != theirs).nonzero()
    return None if unequal.numel() == 0 else (int(unequal[0, 0]), int(unequal[0, 1]))


def why_tokens_can_part(dtype: torch.dtype, kv_dtype: str) -> str:
    """What makes xpu_coopt's logits differ from transformers' under these settings, so that a nearly tied
    token can go the other way; in float32 with a float32 cache nothing does."""
    reasons = []
    if dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        reasons.append(f"in {name} the fused kernels round at other points than transformers' modules")
    if kv_dtype != "auto":
        reasons.append(f"the {kv_dtype} KV cache holds K/V rounded to 8 bits")
    if not reasons:
        return "in float32 with a float32 KV cache they should not part: please report it as a bug"
    return "; ".join(reasons) + ", so nearly tied tokens can go either way"
