"""Readable PyTorch kernels for every op in schema.py: the CPU backend.

They follow Hugging Face's LLaMA arithmetic step for step (where each cast to float32 happens and back),
so that the optimized model matches transformers within rounding. They are the fast path on CPU too, so
they avoid copies where torch allows: decode attention reads the shared prompt K/V once per request with
one batched matmul for all beams and query heads of a KV group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xpu_coopt.ops import fp8
from xpu_coopt.ops.schema import library


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. Not a registered op: GEMMs stay torch's, but the CPU path picks the faster kernel.

    For a single row of 16-bit activations (decode at batch 1), torch's own GEMV streams the weights at
    about 2x the rate of oneDNN's on the CPUs measured here (docs/benchmarks.md); for more rows oneDNN wins.
    """
    if x.device.type != "cpu" or x.dtype == torch.float32 or x.numel() != x.shape[-1]:
        return F.linear(x, weight, bias)
    enabled = torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    hidden = input.float()
    inverse_rms = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True).add_(epsilon))
    # not in place: for float32 input, .float() above returned the input itself
    torch.mul(weight, (hidden * inverse_rms).to(input.dtype), out=out)


def fused_add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> None:
    residual.add_(input)
    rms_norm(input, residual, weight, epsilon)


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    gate, up = input.chunk(2, dim=-1)
    torch.mul(F.silu(gate), up, out=out)


def _rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x: [N, heads, D]; cos, sin: [N, 1, D/2] in x's dtype. Rotate-half (neox) layout, as transformers:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), rounded in x's dtype after each product as it does."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated_first = x1 * cos - x2 * sin
    x2.copy_(x2 * cos + x1 * sin)
    x1.copy_(rotated_first)


def _load_cache(cache: torch.Tensor, scale: torch.Tensor | None, kv_format: str, dtype: torch.dtype):
    """The cache's values in dtype: FP8 codes are dequantized, 16/32-bit caches are returned as they are."""
    if fp8.is_fp8(kv_format):
        return fp8.decode(cache, scale, kv_format, dtype)
    return cache


def kv_write(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    cache_rows: torch.Tensor,
    cache_positions: torch.Tensor,
    kv_format: str,
) -> None:
    # Advanced indices around a slice: cache[rows, :, positions] addresses [N, num_kv_heads, head_dim].
    index = (cache_rows, slice(None), cache_positions)
    for source, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        if fp8.is_fp8(kv_format):
            token_scale = fp8.dynamic_scale(source, kv_format)
            scale[index] = token_scale
            cache[index] = fp8.encode(source, token_scale, kv_format)
        else:
            cache[index] = source.to(cache.dtype)


def rotary_embedding_kv_write(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    cache_rows: torch.Tensor,
    cache_positions: torch.Tensor,
    kv_format: str,
) -> None:
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].to(query.dtype).unsqueeze(1)  # [N, 1, D]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    _rotate_in_place(query, cos, sin)
    _rotate_in_place(key, cos, sin)
    kv_write(key, value, k_cache, v_cache, k_scale, v_scale, cache_rows, cache_positions, kv_format)


def attention_prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_start: torch.Tensor,
    scale: float,
) -> None:
    seq_len = query.shape[1]
    positions = torch.arange(seq_len, device=query.device)
    causal = positions[None, :] <= positions[:, None]  # [S_q, S_k]
    key_valid = positions[None, :] >= seq_start[:, None].to(positions.dtype)  # [B, S_k]
    query_valid = key_valid  # the same rule, read along the query axis
    mask = causal[None] & key_valid[:, None, :]
    # Padding rows have no key to attend to; let them see themselves so softmax stays finite, then zero them.
    mask = mask | torch.eye(seq_len, dtype=torch.bool, device=query.device)[None]
    result = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)
    out.copy_(result * query_valid[:, :, None, None])


def segment_attention_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    prompt_k_scale: torch.Tensor | None,
    prompt_v_scale: torch.Tensor | None,
    prompt_start: torch.Tensor,
    response_k: torch.Tensor,
    response_v: torch.Tensor,
    response_k_scale: torch.Tensor | None,
    response_v_scale: torch.Tensor | None,
    beam_slots: torch.Tensor,
    response_len: int,
    scale: float,
    kv_format: str,
) -> None:
    num_seqs, num_heads, head_dim = query.shape
    num_requests, num_kv_heads, prompt_len, _ = prompt_k.shape
    num_beams = num_seqs // num_requests
    group = num_heads // num_kv_heads
    dtype = query.dtype

    # Prompt segment: one matmul per (request, KV head) covers every beam and every query head of the group.
    pk = _load_cache(prompt_k, prompt_k_scale, kv_format, dtype)  # [R, Hkv, P, D]
    pv = _load_cache(prompt_v, prompt_v_scale, kv_format, dtype)
    q_by_request = (
        query.view(num_requests, num_beams, num_kv_heads, group, head_dim)
        .transpose(1, 2)
        .reshape(num_requests, num_kv_heads, num_beams * group, head_dim)
    )
    prompt_scores = torch.matmul(q_by_request, pk.transpose(-1, -2)).float() * scale  # [R, Hkv, nb*G, P]
    if bool(prompt_start.any()):  # left padding in the batch: padding positions are never read
        padding = torch.arange(prompt_len, device=query.device)[None, :] < prompt_start[:, None]  # [R, P]
        prompt_scores.masked_fill_(padding[:, None, None, :], float("-inf"))
        pv = pv.masked_fill(padding[:, None, :, None], 0)  # a zero weight times garbage could still be NaN
    prompt_scores = (
        prompt_scores.view(num_requests, num_kv_heads, num_beams, group, prompt_len)
        .transpose(1, 2)
        .reshape(num_seqs, num_kv_heads, group, prompt_len)
    )

    # Response segment: each beam's rows, gathered through beam_slots (integers only were reordered).
    steps = torch.arange(response_len, device=query.device)
    slots = beam_slots[:, :response_len]  # [S, T]
    rk = _load_cache(
        response_k[slots, :, steps], _scale_rows(response_k_scale, slots, steps), kv_format, dtype
    )
    rv = _load_cache(
        response_v[slots, :, steps], _scale_rows(response_v_scale, slots, steps), kv_format, dtype
    )
    rk, rv = rk.transpose(1, 2), rv.transpose(1, 2)  # [S, Hkv, T, D]
    q_by_seq = query.view(num_seqs, num_kv_heads, group, head_dim)
    response_scores = torch.matmul(q_by_seq, rk.transpose(-1, -2)).float() * scale  # [S, Hkv, G, T]

    probs = torch.softmax(torch.cat((prompt_scores, response_scores), dim=-1), dim=-1).to(dtype)
    prompt_probs = (
        probs[..., :prompt_len]
        .reshape(num_requests, num_beams, num_kv_heads, group, prompt_len)
        .transpose(1, 2)
        .reshape(num_requests, num_kv_heads, num_beams * group, prompt_len)
    )
    from_prompt = (
        torch.matmul(prompt_probs, pv)
        .view(num_requests, num_kv_heads, num_beams, group, head_dim)
        .transpose(1, 2)
        .reshape(num_seqs, num_heads, head_dim)
    )
    from_response = torch.matmul(probs[..., prompt_len:], rv).reshape(num_seqs, num_heads, head_dim)
    torch.add(from_prompt, from_response, out=out)


def _scale_rows(scale: torch.Tensor | None, slots: torch.Tensor, steps: torch.Tensor) -> torch.Tensor | None:
    return None if scale is None else scale[slots, :, steps]


KERNELS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_embedding_kv_write": rotary_embedding_kv_write,
    "kv_write": kv_write,
    "attention_prefill": attention_prefill,
    "segment_attention_decode": segment_attention_decode,
}

for _name, _kernel in KERNELS.items():
    library().impl(_name, _kernel, "CPU")
