"""Parity smoke test on a GPU (run by hand where one exists; CI has none): xpu_coopt against transformers
on the same device, greedy and beam search token for token, prefill logits in float16.

    python scripts/cuda_smoke.py [--device cuda] [--backend torch]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import xpu_coopt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args()
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
        ours = optimized.generate(ids, attention_mask=mask, **kwargs)
        theirs = model.generate(ids, attention_mask=mask, **kwargs)
        same = torch.equal(ours, theirs)
        print(f"{name}: tokens identical to transformers: {same}")
        failures += [] if same else [name]
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
    print("PASS" if not failures else f"FAIL: {failures}")


if __name__ == "__main__":
    main()
