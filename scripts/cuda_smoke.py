"""Parity smoke test on a GPU (run by hand where one exists; CI has none): xpu_coopt against transformers
on the same device, greedy and beam search token for token (each twice, the second time over shorter
prompts through the decode graph the first kept, when it uses CUDA graphs), prefill logits in float16; with the Triton
backend also its FP8 decode attention against the reference kernel on the same GPU tensors, with the
decode launch options given (e.g. --fp8-upcast-in-registers, which only a GPU can check).

    python scripts/cuda_smoke.py [--device cuda] [--backend torch] [decode launch options]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import xpu_coopt
from xpu_coopt.backends.cpu import cpu_kernels
from xpu_coopt.backends.triton.tuning import add_decode_launch_arguments, apply_decode_launch
from xpu_coopt.ops import fp8


def fp8_decode_error(device: str, kv_dtype: str, beams: int) -> float:
    """Largest relative difference between the Triton kernel's FP8 decode attention and the reference
    kernel's, same inputs: llama-2-7b heads, a 4096-token prompt (split across programs), 9 response steps."""
    from xpu_coopt.backends.triton.kernels import triton_kernels

    generator = torch.Generator(device=device).manual_seed(beams)

    def cache(*shape):
        values = torch.randn(*shape, device=device, generator=generator, dtype=torch.float16)
        scale = fp8.dynamic_scale(values, kv_dtype).to(fp8.SCALE_DTYPE)
        return fp8.encode(values, scale, kv_dtype), scale

    heads, head_dim, prompt, steps = 32, 128, 4096, 9
    query = torch.randn(beams, heads, head_dim, device=device, generator=generator, dtype=torch.float16)
    (pk, pk_s), (pv, pv_s) = cache(1, heads, prompt, head_dim), cache(1, heads, prompt, head_dim)
    (rk, rk_s), (rv, rv_s) = cache(beams, heads, steps, head_dim), cache(beams, heads, steps, head_dim)
    slots = torch.arange(beams, device=device, dtype=torch.int32)[:, None].repeat(1, steps)
    start = torch.tensor([5], device=device, dtype=torch.int32)
    outputs = []
    for kernels in (triton_kernels(), cpu_kernels()):
        out = torch.empty_like(query)
        kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, start, rk, rv, rk_s, rv_s, slots, steps,
                                         head_dim**-0.5, kv_dtype)  # fmt: skip
        outputs.append(out.float())
    return ((outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="torch")
    add_decode_launch_arguments(parser)
    args = parser.parse_args()
    if args.backend == "triton":
        print(f"decode launch: {apply_decode_launch(args)}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(config).eval().to(args.device)
    ids = torch.randint(3, 512, (2, 37), device=args.device)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    failures = []
    optimized = xpu_coopt.optimize(model, backend=args.backend)
    for name, kwargs in {
        "greedy": dict(max_new_tokens=24, do_sample=False, pad_token_id=0),
        "beam4": dict(max_new_tokens=16, num_beams=4, num_return_sequences=2, pad_token_id=0, eos_token_id=5),
    }.items():
        graphs = []
        for prompt, prompt_mask, label in (
            (ids, mask, name),
            (ids[:, 6:], mask[:, 6:], f"{name}, shorter prompts"),
        ):
            ours = optimized.generate(prompt, attention_mask=prompt_mask, **kwargs)
            theirs = model.generate(prompt, attention_mask=prompt_mask, **kwargs)
            same = torch.equal(ours, theirs)
            kept = optimized._kept.session
            graphs.append(None if kept is None else kept.graph)
            print(f"{label}: tokens identical to transformers: {same}")
            failures += [] if same else [label]
        if optimized.cuda_graph:
            reused = graphs[0] is graphs[1] is not None
            print(f"{name}: the shorter prompts replayed the decode graph of the first run: {reused}")
            failures += [] if reused else [f"{name} graph reuse"]
    half = LlamaForCausalLM(config).eval().to(args.device, torch.float16)
    half.load_state_dict(model.state_dict())
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = half(ids, attention_mask=mask, position_ids=positions).logits
    got = xpu_coopt.optimize(half, backend=args.backend)(ids, mask).logits
    valid = mask.bool()
    relative = ((got - expected).abs()[valid].max() / expected.abs()[valid].max()).item()
    print(f"float16 prefill logits: relative max error {relative:.2e}")
    failures += [] if relative < 5e-3 else ["fp16 logits"]
    if args.backend == "triton":
        for kv_dtype in ("fp8_e4m3", "fp8_e5m2"):
            for beams in (1, 4):
                error = fp8_decode_error(args.device, kv_dtype, beams)
                print(f"{kv_dtype} decode attention, {beams} beam(s): relative max error {error:.2e}")
                failures += [] if error < 2e-2 else [f"{kv_dtype} decode, {beams} beams"]
    print("PASS" if not failures else f"FAIL: {failures}")


if __name__ == "__main__":
    main()
