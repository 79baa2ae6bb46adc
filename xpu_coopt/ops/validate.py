"""One validator per op (docs/ops.md): it checks a call against the op's contract and a backend's stated
limits, and returns the call as the kernels take it (row views, shapes, strides, resolved lengths).

Every backend's kernels are reached through entries that call these validators first (ops/registry.py),
so all backends accept exactly the calls the contract accepts, and raise the same exception, with the same
message, for the others: a ValueError for a shape, layout or value, a TypeError for a dtype.

The ops a decode step calls a hundred times (the norms, silu_and_mul, the cache writes, decode attention)
first try a guard that accepts their common form in one expression: it is stricter than the checks after
it, which decide, and say why, for every call it does not accept. It halves their cost (the checks run a
call's rules one helper at a time; about 0.5 ms of a SmolLM2-135M CPU decode step).
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
    PagedCall,
    PrefillCall,
    SiluCall,
)
from xpu_coopt.ops.checks import (
    ACTIVATION_DTYPES,
    UNBOUNDED_SPAN,
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
    paged_shapes,
    prefill_shapes,
    prompt_capacity,
    rows,
    segment_lens_tensor,
    window_span,
)
from xpu_coopt.ops.schema import KV_DTYPES, NO_WINDOW


def rms_norm(
    limits: Limits, out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> NormCall:
    op = "rms_norm"
    if _plain_rows(limits, input, weight, out):
        return NormCall(_rows(op, "out", out), _rows(op, "input", input), weight, epsilon)
    activation_dtype(op, limits.backend, input, out, weight)
    norm_rows(op, limits, input, weight, "out", out)
    return NormCall(rows(op, "out", out), rows(op, "input", input), weight, epsilon)


def fused_add_rms_norm(
    limits: Limits, input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> AddNormCall:
    op = "fused_add_rms_norm"
    if _plain_rows(limits, input, weight, residual):
        return AddNormCall(_rows(op, "input", input), _rows(op, "residual", residual), weight, epsilon)
    activation_dtype(op, limits.backend, input, residual, weight)
    norm_rows(op, limits, input, weight, "residual", residual)
    return AddNormCall(rows(op, "input", input), rows(op, "residual", residual), weight, epsilon)


def silu_and_mul(limits: Limits, out: torch.Tensor, input: torch.Tensor) -> SiluCall:
    op = "silu_and_mul"
    dtype = input.dtype
    if (
        dtype in ACTIVATION_DTYPES and out.dtype == dtype and input.stride()[-1] == 1 and out.stride()[-1] == 1
        and input.shape[:-1] == out.shape[:-1] and input.shape[-1] == 2 * out.shape[-1]
    ):  # fmt: skip
        return SiluCall(_rows(op, "out", out), _rows(op, "input", input))
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
    if _plain_kv_write(
        limits, query, key, value, cos_sin, cache, cache_rows, cache_positions, kv_dtype, static_scale
    ):
        strides = (*cache[0].stride()[:3], *(cache[2].stride()[:3] if cache[2] is not None else (0, 0, 0)))
        return KVWriteCall(op, query, key, value, cos_sin, cache, cache_rows, cache_positions, kv_dtype,
                           static_scale, strides)  # fmt: skip
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
    prompt = (prompt_k, prompt_v, prompt_k_scale, prompt_v_scale)
    response = (response_k, response_v, response_k_scale, response_v_scale)
    accepted = _plain_decode(limits, out, query, prompt, prompt_start, response, beam_slots, kv_dtype,
                             segment_lens, prompt_block_table, prompt_len, window)  # fmt: skip
    if accepted is not None:
        capacity, span = accepted
        rings = (prompt_block_table is None and span <= prompt_k.shape[2], span <= response_k.shape[2])
        return DecodeCall(out, query, prompt, prompt_start, response, beam_slots, response_len, scale, kv_dtype,
                          segment_lens, prompt_block_table, capacity, span, rings)  # fmt: skip
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
    rings = (prompt_block_table is None and span <= prompt_k.shape[2], span <= response_k.shape[2])
    return DecodeCall(out, query, prompt, prompt_start, response, beam_slots, response_len, scale, kv_dtype,
                      segment_lens, prompt_block_table, capacity, span, rings)  # fmt: skip


# --- the guards: a call's common form accepted in one expression, stricter than the checks ----------------


def _rows(op: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """checks.rows(), without a call for the 2-D tensors a guarded call mostly has."""
    return tensor if tensor.ndim == 2 else rows(op, name, tensor)


def _plain_rows(limits: Limits, input: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> bool:
    """A norm's common call: one activation dtype, rows contiguous in their last dimension, `other` shaped
    as input, a weight as wide as a row, within the backend's width."""
    dtype, hidden = input.dtype, input.shape[-1]
    return (
        dtype in ACTIVATION_DTYPES and other.dtype == dtype and weight.dtype == dtype
        and input.stride()[-1] == 1 and other.stride()[-1] == 1 and weight.stride()[-1] == 1
        and other.shape == input.shape and weight.dim() == 1 and weight.shape[0] == hidden
        and (limits.max_hidden is None or hidden <= limits.max_hidden)
    )  # fmt: skip


def _plain_kv_write(limits: Limits, query, key, value, cos_sin, cache: KVTensors, cache_rows, cache_positions,
                    kv_dtype: str, static_scale: bool) -> bool:  # fmt: skip
    """A cache write's common call: [T, heads, D] activations of one dtype, heads D apart, the cache in the
    format kv_dtype names, K and V (and scales) alike, int64 indices of T tokens."""
    k_cache, v_cache, k_scale, v_scale = cache
    dtype, shape, key_stride, value_stride = key.dtype, key.shape, key.stride(), value.stride()
    if not (dtype in ACTIVATION_DTYPES and value.dtype == dtype and len(shape) == 3 and value.shape == shape):
        return False
    tokens, kv_heads, dim = shape
    if kv_dtype == "auto":
        cache_ok = k_cache.dtype == dtype and not static_scale and k_scale is None and v_scale is None
    else:
        cache_ok = (kv_dtype in KV_DTYPES and k_cache.dtype == torch.uint8 and k_scale is not None
                    and v_scale is not None and k_scale.dtype == v_scale.dtype == torch.bfloat16
                    and k_scale.stride() == v_scale.stride())  # fmt: skip
    return (
        cache_ok and k_cache.stride() == v_cache.stride() and not dim % 2
        and (limits.max_head_dim is None or dim <= limits.max_head_dim)
        and key_stride[-1] == 1 and value_stride[-1] == 1 and k_cache.stride()[-1] == 1
        and (kv_heads <= 1 or (key_stride[1] == dim and value_stride[1] == dim))
        and cache_rows.dtype == torch.int64 and cache_positions.dtype == torch.int64
        and cache_rows.shape == (tokens,) and cache_positions.shape == (tokens,)
        and (query is None or (query.dtype == dtype and query.dim() == 3 and query.shape[0] == tokens
                               and query.shape[2] == dim and (query.shape[1] <= 1 or query.stride()[1] == dim)))
        and (cos_sin is None or (cos_sin.dtype == dtype and cos_sin.shape == (tokens, dim)
                                 and cos_sin.stride()[-1] == 1))
    )  # fmt: skip


def _plain_decode(limits: Limits, out, query, prompt: KVTensors, prompt_start, response: KVTensors, beam_slots,
                  kv_dtype: str, segment_lens, block_table, prompt_len: int, window: int) -> tuple[int, int] | None:  # fmt: skip
    """A decode call's common form: query and out [S, H, D] alike, both segments [rows, Hkv, columns, D]
    alike, H a multiple of Hkv, S of the R requests, every tensor contiguous in its last dimension, heads D
    apart, int32 slots (and table, and lengths [2]), the prompt_len within what the segment holds.
    Returns (the prompt columns attended, the window's span), or None."""
    if window != NO_WINDOW and not 1 <= window < UNBOUNDED_SPAN:
        return None
    span = UNBOUNDED_SPAN if window == NO_WINDOW else window
    prompt_k, prompt_v = prompt[0], prompt[1]
    response_k, response_v = response[0], response[1]
    shape, prompt_shape, response_shape = query.shape, prompt_k.shape, response_k.shape
    query_stride, out_stride = query.stride(), out.stride()
    dtype = query.dtype
    if not (
        len(shape) == 3 and out.shape == shape and dtype in ACTIVATION_DTYPES
        and out.dtype == dtype and kv_dtype in KV_DTYPES and prompt_start.dim() == 1
        and len(prompt_shape) == 4 and prompt_v.shape == prompt_shape and len(response_shape) == 4
        and response_v.shape == response_shape and prompt_shape[3] == shape[2] == response_shape[3]
        and prompt_shape[1] == response_shape[1] > 0
    ):  # fmt: skip
        return None
    sequences, heads, dim = shape
    requests = prompt_start.shape[0]
    if not (
        requests and not sequences % requests and not heads % prompt_shape[1] and not dim % 2
        and (limits.max_head_dim is None or dim <= limits.max_head_dim)
        and query_stride[-1] == 1 and out_stride[-1] == 1 and prompt_k.stride()[-1] == 1
        and prompt_v.stride()[-1] == 1 and response_k.stride()[-1] == 1 and response_v.stride()[-1] == 1
        and beam_slots.stride()[-1] == 1 and (heads <= 1 or (query_stride[1] == dim and out_stride[1] == dim))
        and beam_slots.dtype == torch.int32
        and (segment_lens is None or (segment_lens.dtype == torch.int32 and segment_lens.shape == (2,)))
    ):  # fmt: skip
        return None
    if block_table is None:
        held = prompt_shape[2]
    elif (block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == requests
          and block_table.stride()[-1] == 1 and not prompt_shape[2] % limits.block_multiple):  # fmt: skip
        held = block_table.shape[1] * prompt_shape[2]
    else:
        return None
    if prompt_len == -1:
        return held, span
    ring = block_table is None and span <= prompt_shape[2]
    return (prompt_len, span) if prompt_len >= 0 and (prompt_len <= held or ring) else None


def paged_attention(
    limits: Limits,
    out: torch.Tensor,
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_dtype: str,
    window: int = NO_WINDOW,
) -> PagedCall:
    op = "paged_attention"
    span = window_span(op, window)
    activation_dtype(op, limits.backend, query, out)
    cache_write(op, kv_dtype, query, k_pool, static_scale=False)
    paged_shapes(op, out, query, k_pool, v_pool, block_tables, query_start, context_lens)
    head_dim(op, limits, query.shape[2])
    inner_contiguous(op, out=out, query=query, k_pool=k_pool, v_pool=v_pool)
    if (k_scale is None) != (kv_dtype == "auto") or (v_scale is None) != (kv_dtype == "auto"):
        raise ValueError(f"{op}: an FP8 pool takes k_scale and v_scale, a kv_dtype='auto' one neither")
    return PagedCall(out, query, (k_pool, v_pool, k_scale, v_scale), block_tables, query_start, context_lens,
                     scale, kv_dtype, span)  # fmt: skip
