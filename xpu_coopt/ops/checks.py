"""The checks the validators share (validate.py), as clear errors naming the op, the argument and the
limit; the GEMMs' launchers use some of them too (docs/ops.md, "linear")."""

from __future__ import annotations

import torch

from xpu_coopt.ops.calls import Limits
from xpu_coopt.ops.schema import KV_DTYPES, NO_WINDOW

UNBOUNDED_SPAN = 1 << 30

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def activation_dtype(op: str, backend: str, *tensors: torch.Tensor) -> torch.dtype:
    """The one dtype the activations share; TypeError otherwise."""
    dtype = tensors[0].dtype
    if dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"{op}: the {backend} kernels take float32, float16 or bfloat16 activations, not {dtype}"
        )
    for tensor in tensors[1:]:
        if tensor.dtype != dtype:
            raise TypeError(f"{op}: all activations must share one dtype, got {dtype} and {tensor.dtype}")
    return dtype


def kv_dtype_name(op: str, name: str) -> str:
    if name not in KV_DTYPES:
        raise ValueError(f"{op}: unknown kv_dtype {name!r}; choose one of {KV_DTYPES}")
    return name


def cache_write(op: str, name: str, key: torch.Tensor, k_cache: torch.Tensor, static_scale: bool) -> str:
    """The cache-write ops' kv_dtype: known, matching the cache, static scales only for FP8 caches."""
    kv_dtype_name(op, name)
    if name == "auto" and k_cache.dtype != key.dtype:
        raise TypeError(f"{op}: a kv_dtype='auto' cache must have the activation dtype {key.dtype}")
    if name != "auto" and k_cache.dtype != torch.uint8:
        raise TypeError(f"{op}: a kv_dtype={name!r} cache holds uint8 codes, not {k_cache.dtype}")
    if static_scale and name == "auto":
        raise ValueError(f"{op}: static_scale applies to FP8 caches only, not kv_dtype='auto'")
    return name


def window_span(op: str, window: int) -> int:
    """The keys a query attends to at most, itself included: `window`, or UNBOUNDED_SPAN for NO_WINDOW.
    ValueError for anything else below 1 (a window must at least hold the query's own key)."""
    if window == NO_WINDOW:
        return UNBOUNDED_SPAN
    if not 1 <= window < UNBOUNDED_SPAN:
        raise ValueError(
            f"{op}: window must be {NO_WINDOW} (none) or from 1 to {UNBOUNDED_SPAN - 1}, not {window}"
        )
    return window


def head_dim(op: str, limits: Limits, size: int) -> int:
    """An even head_dim (rotate-half pairs its halves), within the backend's limit."""
    if size % 2:
        raise ValueError(f"{op}: head_dim must be even, not {size}")
    if limits.max_head_dim is not None and size > limits.max_head_dim:
        raise ValueError(
            f"{op}: the {limits.backend} kernels support head_dim up to {limits.max_head_dim}, not {size}"
        )
    return size


def norm_rows(
    op: str, limits: Limits, input: torch.Tensor, weight: torch.Tensor, name: str, other: torch.Tensor
):
    """The norms' rows: contiguous in their last dimension, `other` (out or residual) shaped as input, the
    weight as wide as a row."""
    inner_contiguous(op, input=input, weight=weight, **{name: other})
    hidden = input.shape[-1]
    if weight.shape != (hidden,) or other.shape != input.shape:
        raise ValueError(
            f"{op}: weight [{hidden}] and {name} shaped as input {tuple(input.shape)}, got weight "
            f"{tuple(weight.shape)}, {name} {tuple(other.shape)}"
        )
    if limits.max_hidden is not None and hidden > limits.max_hidden:
        raise ValueError(
            f"{op}: the {limits.backend} kernels normalise rows of at most {limits.max_hidden} elements, not {hidden}"
        )


def inner_contiguous(op: str, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in its last dimension")


def heads_apart(op: str, size: int, dim: int, **tensors: torch.Tensor | None) -> None:
    """Heads (dimension `dim`) of each tensor are head_dim elements apart, as docs/ops.md requires."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape[dim] > 1 and tensor.stride(dim) != size:
            raise ValueError(f"{op}: the heads of {name} must be head_dim apart")


def prefill_shapes(
    op: str,
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_start: torch.Tensor,
) -> tuple[int, int]:
    """attention_prefill's shapes: query and out [B, Q, H, D], key and value [B, P, Hkv, D] with P >= Q
    (the queries are the last Q of the P columns), H a multiple of Hkv, seq_start [B]. Returns (Q, P)."""
    if query.dim() != 4 or out.shape != query.shape:
        raise ValueError(f"{op}: query and out must be [batch, queries, heads, head_dim] alike, got "
                         f"{tuple(query.shape)} and {tuple(out.shape)}")  # fmt: skip
    batch, queries, heads, dim = query.shape
    if key.dim() != 4 or value.shape != key.shape or key.shape[0] != batch or key.shape[3] != dim:
        raise ValueError(f"{op}: key and value must be [{batch}, columns, kv_heads, {dim}] alike, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")  # fmt: skip
    if key.shape[1] < queries:
        raise ValueError(f"{op}: {queries} queries but only {key.shape[1]} key columns: the queries are the "
                         "last columns of the keys")  # fmt: skip
    if key.shape[2] == 0 or heads % key.shape[2]:
        raise ValueError(f"{op}: {heads} query heads are not a multiple of {key.shape[2]} KV heads")
    if seq_start.shape != (batch,):
        raise ValueError(f"{op}: seq_start must hold {batch} starts, got shape {tuple(seq_start.shape)}")
    return queries, key.shape[1]


def decode_layout(
    op: str,
    out: torch.Tensor,
    query: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    prompt_start: torch.Tensor,
    response_k: torch.Tensor,
    response_v: torch.Tensor,
    beam_slots: torch.Tensor,
) -> None:
    """segment_attention_decode's shapes and layout: query and out [S, H, D] alike, heads D apart, S a
    multiple of the R requests of prompt_start [R]; both segments' K and V alike, [rows, Hkv, columns, D]
    with H a multiple of Hkv; beam_slots int32; every tensor contiguous in its last dimension."""
    shape = query.shape
    if len(shape) != 3 or out.shape != shape:
        raise ValueError(f"{op}: query and out must be [sequences, heads, head_dim] alike, got "
                         f"{tuple(shape)} and {tuple(out.shape)}")  # fmt: skip
    sequences, heads, dim = shape
    requests = prompt_start.shape[0] if prompt_start.dim() == 1 else 0
    if requests == 0 or sequences % requests:
        raise ValueError(f"{op}: prompt_start [requests] must divide the {sequences} sequences into requests' "
                         f"beams, got shape {tuple(prompt_start.shape)}")  # fmt: skip
    kv_heads = prompt_k.shape[1] if prompt_k.dim() == 4 else 0
    for name, k, v in (("prompt", prompt_k, prompt_v), ("response", response_k, response_v)):
        if (
            k.dim() != 4
            or v.shape != k.shape
            or k.shape[3] != dim
            or k.shape[1] != kv_heads
            or not kv_heads
            or heads % kv_heads
        ):
            raise ValueError(f"{op}: {name}_k and {name}_v must be [rows, kv_heads, columns, {dim}] alike, with "
                             f"{heads} heads a multiple of the prompt's kv_heads, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")  # fmt: skip
    inner_contiguous(op, out=out, query=query, prompt_k=prompt_k, prompt_v=prompt_v, response_k=response_k,
                     response_v=response_v, beam_slots=beam_slots)  # fmt: skip
    heads_apart(op, dim, 1, query=query, out=out)
    index_dtype(op, torch.int32, beam_slots=beam_slots)


def paged_shapes(
    op: str,
    out: torch.Tensor,
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """paged_attention's shapes: query and out [T, H, D] alike; k_pool and v_pool [blocks, Hkv, block_size,
    D] alike with H a multiple of Hkv; block_tables [S, N], query_start [S + 1], context_lens [S], int32."""
    if query.dim() != 3 or out.shape != query.shape:
        raise ValueError(f"{op}: query and out must be [tokens, heads, head_dim] alike, got "
                         f"{tuple(query.shape)} and {tuple(out.shape)}")  # fmt: skip
    heads, dim = query.shape[1], query.shape[2]
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape or k_pool.shape[3] != dim or heads % k_pool.shape[1]:
        raise ValueError(f"{op}: k_pool and v_pool must be [blocks, kv_heads, block_size, {dim}] alike, with "
                         f"{heads} heads a multiple of kv_heads, got {tuple(k_pool.shape)} and "
                         f"{tuple(v_pool.shape)}")  # fmt: skip
    index_dtype(
        op, torch.int32, block_tables=block_tables, query_start=query_start, context_lens=context_lens
    )
    sequences = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if block_tables.dim() != 2 or block_tables.shape[0] != sequences or query_start.shape != (sequences + 1,):
        raise ValueError(f"{op}: block_tables [S, blocks], query_start [S + 1] and context_lens [S] must agree, "
                         f"got {tuple(block_tables.shape)}, {tuple(query_start.shape)} and "
                         f"{tuple(context_lens.shape)}")  # fmt: skip


def rows(op: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A [..., width] tensor as a [rows, width] view (any row stride)."""
    if tensor.dim() == 2:
        return tensor
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError as error:
        raise ValueError(f"{op}: {name} must be viewable as [rows, {tensor.shape[-1]}]: {error}") from None


def cache_strides(
    op: str,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> tuple[int, ...]:
    """(row, head, position) strides of the caches, then of the scales (zeros without); K and V (and
    their scales) must share them, so kernels take one set. Scales are bfloat16."""
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"{op}: k_cache and v_cache must have the same strides")
    if (k_scale is None) != (v_scale is None) or (
        k_scale is not None and k_scale.stride() != v_scale.stride()
    ):
        raise ValueError(f"{op}: k_scale and v_scale must both be given, with the same strides")
    if k_scale is not None and (k_scale.dtype != torch.bfloat16 or v_scale.dtype != torch.bfloat16):
        raise TypeError(f"{op}: FP8 scales must be bfloat16, not {k_scale.dtype} / {v_scale.dtype}")
    scale_strides = k_scale.stride()[:3] if k_scale is not None else (0, 0, 0)
    return (*k_cache.stride()[:3], *scale_strides)


def index_dtype(op: str, dtype: torch.dtype, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != dtype:
            raise TypeError(f"{op}: {name} must be {dtype}, not {tensor.dtype}")


def segment_lens_tensor(op: str, segment_lens: torch.Tensor | None) -> None:
    """segment_attention_decode's optional device-side lengths: int32 [2] (prompt columns, response steps)."""
    if segment_lens is not None and (segment_lens.dtype != torch.int32 or segment_lens.shape != (2,)):
        raise ValueError(
            f"{op}: segment_lens must be an int32 tensor of shape (2,), not {segment_lens.dtype} "
            f"{tuple(segment_lens.shape)}"
        )


def is_ring(prompt_k: torch.Tensor, block_table: torch.Tensor | None, span: int) -> bool:
    """Whether a decode call may attend more prompt-segment columns than the segment holds: one without a
    block table is a ring (column n held at n % its columns), which a window no longer than it reads whole."""
    return block_table is None and span <= prompt_k.shape[2]


def prompt_capacity(
    op: str,
    prompt_k: torch.Tensor,
    prompt_start: torch.Tensor,
    block_table: torch.Tensor | None,
    prompt_len: int,
    span: int = UNBOUNDED_SPAN,
) -> int:
    """The prompt segment's columns a decode call attends: prompt_len, or with -1 all the segment holds
    (prompt_k's columns, or with a block table, its blocks' columns). Checks the block table too. More
    than it holds only as a ring (is_ring: no table, a window of `span` columns within it)."""
    if block_table is None:
        held = prompt_k.shape[2]
    else:
        requests = prompt_start.shape[0]
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != requests:
            raise ValueError(
                f"{op}: prompt_block_table must be an int32 tensor [requests={requests}, blocks], not "
                f"{block_table.dtype} {tuple(block_table.shape)}"
            )
        if block_table.stride(-1) != 1:
            raise ValueError(f"{op}: prompt_block_table must be contiguous in its last dimension")
        held = block_table.shape[1] * prompt_k.shape[2]
    if prompt_len == -1:
        return held
    if prompt_len < 0 or (prompt_len > held and not is_ring(prompt_k, block_table, span)):
        raise ValueError(f"{op}: prompt_len {prompt_len} is beyond {_capacity_text(held, block_table)}")
    return prompt_len


def _capacity_text(held: int, block_table: torch.Tensor | None) -> str:
    if block_table is not None:
        return f"the {held} columns its blocks hold"
    return f"the {held} columns prompt_k holds (more only under a window of at most {held}: a ring)"
