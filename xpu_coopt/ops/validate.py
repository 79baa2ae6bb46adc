"""One validator per op (docs/ops.md): it checks a call against the op's contract and a backend's stated
limits, and returns the call as the kernels take it (row views, shapes, strides, resolved lengths).

Every backend's kernels are reached through entries that call these validators first (ops/registry.py),
so all backends accept exactly the calls the contract accepts, and raise the same exception, with the same
message, for the others: a ValueError for a shape, layout or value, a TypeError for a dtype.
"""

from __future__ import annotations

import torch

from xpu_coopt.ops.calls import (
    AddNormCall,
    DecodeCall,
    KVTensors,
    KVWriteCall,
    Limits,
    NormCall,
    PrefillCall,
    SiluCall,
)
from xpu_coopt.ops.checks import (
    activation_dtype,
    cache_strides,
    cache_write,
    decode_layout,
    head_dim,
    heads_apart,
    index_dtype,
    inner_contiguous,
    kv_dtype_name,
    norm_rows,
    prefill_shapes,
    prompt_capacity,
    rows,
    segment_lens_tensor,
    window_span,
)
from xpu_coopt.ops.schema import NO_WINDOW


def rms_norm(
    limits: Limits, out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> NormCall:
    op = "rms_norm"
    activation_dtype(op, limits.backend, input, out, weight)
    norm_rows(op, limits, input, weight, "out", out)
    return NormCall(rows(op, "out", out), rows(op, "input", input), weight, epsilon)


def fused_add_rms_norm(
    limits: Limits, input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> AddNormCall:
    op = "fused_add_rms_norm"
    activation_dtype(op, limits.backend, input, residual, weight)
    norm_rows(op, limits, input, weight, "residual", residual)
    return AddNormCall(rows(op, "input", input), rows(op, "residual", residual), weight, epsilon)


def silu_and_mul(limits: Limits, out: torch.Tensor, input: torch.Tensor) -> SiluCall:
    op = "silu_and_mul"
    activation_dtype(op, limits.backend, input, out)
    inner_contiguous(op, out=out, input=input)
    if input.shape[:-1] != out.shape[:-1] or input.shape[-1] != 2 * out.shape[-1]:
        raise ValueError(
            f"{op}: input [..., 2d] and out [..., d] alike, got {tuple(input.shape)} and {tuple(out.shape)}"
        )
    return SiluCall(rows(op, "out", out), rows(op, "input", input))


def rotary_embedding_kv_write(
    limits: Limits,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    cache_rows: torch.Tensor,
    cache_positions: torch.Tensor,
    kv_dtype: str,
    static_scale: bool = False,
) -> KVWriteCall:
    cache = (k_cache, v_cache, k_scale, v_scale)
    return _kv_write_call("rotary_embedding_kv_write", limits, query, key, value, cos_sin, cache, cache_rows,
                          cache_positions, kv_dtype, static_scale)  # fmt: skip


def kv_write(
    limits: Limits,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    cache_rows: torch.Tensor,
    cache_positions: torch.Tensor,
    kv_dtype: str,
    static_scale: bool = False,
) -> KVWriteCall:
    cache = (k_cache, v_cache, k_scale, v_scale)
    return _kv_write_call("kv_write", limits, None, key, value, None, cache, cache_rows, cache_positions,
                          kv_dtype, static_scale)  # fmt: skip


def _kv_write_call(
    op: str,
    limits: Limits,
    query: torch.Tensor | None,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor | None,
    cache: KVTensors,
    cache_rows: torch.Tensor,
    cache_positions: torch.Tensor,
    kv_dtype: str,
    static_scale: bool,
) -> KVWriteCall:
    """The two cache-write ops' checks (kv_write has neither query nor cos_sin)."""
    activation_dtype(op, limits.backend, key, value, *(t for t in (query, cos_sin) if t is not None))
    cache_write(op, kv_dtype, key, cache[0], static_scale)
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"{op}: key and value must be [tokens, kv_heads, head_dim] alike, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")  # fmt: skip
    tokens, _, dim = key.shape
    if query is not None and (query.dim() != 3 or query.shape[0] != tokens or query.shape[2] != dim):
        raise ValueError(f"{op}: query must be [{tokens}, heads, {dim}], got {tuple(query.shape)}")
    if cos_sin is not None and cos_sin.shape != (tokens, dim):
        raise ValueError(f"{op}: cos_sin must be [{tokens}, {dim}], got {tuple(cos_sin.shape)}")
    head_dim(op, limits, dim)
    inner_contiguous(op, key=key, value=value, k_cache=cache[0], v_cache=cache[1], cos_sin=cos_sin)
    heads_apart(op, dim, 1, query=query, key=key, value=value)
    index_dtype(op, torch.int64, cache_rows=cache_rows, cache_positions=cache_positions)
    if cache_rows.shape != (tokens,) or cache_positions.shape != (tokens,):
        raise ValueError(f"{op}: cache_rows and cache_positions must hold {tokens} indices each")
    strides = cache_strides(op, *cache)
    return KVWriteCall(op, query, key, value, cos_sin, cache, cache_rows, cache_positions, kv_dtype,
                       static_scale, strides)  # fmt: skip


def attention_prefill(
    limits: Limits,
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_start: torch.Tensor,
    scale: float,
    window: int = NO_WINDOW,
) -> PrefillCall:
    op = "attention_prefill"
    span = window_span(op, window)
    activation_dtype(op, limits.backend, query, key, value, out)
    prefill_shapes(op, out, query, key, value, seq_start)
    head_dim(op, limits, query.shape[3])
    inner_contiguous(op, out=out, query=query, key=key, value=value)
    heads_apart(op, query.shape[3], 2, out=out, query=query, key=key, value=value)
    return PrefillCall(out, query, key, value, seq_start, scale, span)


def segment_attention_decode(
    limits: Limits,
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
    kv_dtype: str,
    segment_lens: torch.Tensor | None = None,
    prompt_block_table: torch.Tensor | None = None,
    prompt_len: int = -1,
    window: int = NO_WINDOW,
) -> DecodeCall:
    op = "segment_attention_decode"
    span = window_span(op, window)
    activation_dtype(op, limits.backend, query, out)
    kv_dtype_name(op, kv_dtype)
    decode_layout(op, out, query, prompt_k, prompt_v, prompt_start, response_k, response_v, beam_slots)
    head_dim(op, limits, query.shape[2])
    segment_lens_tensor(op, segment_lens)
    capacity = prompt_capacity(op, prompt_k, prompt_start, prompt_block_table, prompt_len, span)
    if prompt_block_table is not None and prompt_k.shape[2] % limits.block_multiple:
        raise ValueError(
            f"{op}: the {limits.backend} kernel reads a paged prompt segment in tiles of {limits.block_multiple} "
            f"columns, so its blocks must hold a multiple of {limits.block_multiple}, not {prompt_k.shape[2]}"
        )
    prompt = (prompt_k, prompt_v, prompt_k_scale, prompt_v_scale)
    response = (response_k, response_v, response_k_scale, response_v_scale)
    rings = (prompt_block_table is None and span <= prompt_k.shape[2], span <= response_k.shape[2])
    return DecodeCall(out, query, prompt, prompt_start, response, beam_slots, response_len, scale, kv_dtype,
                      segment_lens, prompt_block_table, capacity, span, rings)  # fmt: skip
