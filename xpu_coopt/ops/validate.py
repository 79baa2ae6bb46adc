"""One validator per op (docs/ops.md): it checks a call against the op's contract and a backend's stated
limits, and returns the call as the kernels take it (row views, shapes, strides, resolved lengths).

Every backend's kernels are reached through entries that call these validators first (ops/registry.py),
so all backends accept exactly the calls the contract accepts, and raise the same exception, with the same
message, for the others: a ValueError for a shape, layout or value, a TypeError for a dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xpu_coopt.ops.schema import KV_DTYPES, NO_WINDOW

# What the kernels take for "no window": a span longer than any sequence, so that the window's first
# column (the query's column + 1 - span) falls before column 0 and no branch is needed. Small enough that
# int32 arithmetic on it cannot overflow.
UNBOUNDED_SPAN = 1 << 30

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Limits:
    """What a backend's kernels support beyond the contract, stated once and checked by the validators."""

    backend: str  # named in the errors
    max_head_dim: int | None = None
    max_hidden: int | None = None  # the norms' row width
    block_multiple: int = 1  # a paged prompt segment's blocks hold a multiple of this many columns


# The K and V of a segment with their FP8 scales (None for a 16-bit cache), in the ops' argument order.
KVTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass(slots=True)
class NormCall:
    """rms_norm: out, input [rows, hidden] (views of the caller's tensors), weight [hidden]."""

    out: torch.Tensor
    input: torch.Tensor
    weight: torch.Tensor
    epsilon: float


@dataclass(slots=True)
class AddNormCall:
    """fused_add_rms_norm: input, residual [rows, hidden] (views), weight [hidden]."""

    input: torch.Tensor
    residual: torch.Tensor
    weight: torch.Tensor
    epsilon: float


@dataclass(slots=True)
class SiluCall:
    """silu_and_mul: out [rows, d], input [rows, 2d] (views)."""

    out: torch.Tensor
    input: torch.Tensor


@dataclass(slots=True)
class KVWriteCall:
    """rotary_embedding_kv_write, or kv_write where query and cos_sin are None."""

    op: str
    query: torch.Tensor | None  # [T, H, D]
    key: torch.Tensor  # [T, Hkv, D]
    value: torch.Tensor
    cos_sin: torch.Tensor | None  # [T, D]
    cache: KVTensors  # [rows, Hkv, L, D], scales [rows, Hkv, L]
    cache_rows: torch.Tensor  # int64 [T]
    cache_positions: torch.Tensor
    kv_dtype: str
    static_scale: bool
    strides: tuple[int, ...]  # cache_strides(): the caches' (row, head, position), then the scales'

    @property
    def heads(self) -> int:
        return 0 if self.query is None else self.query.shape[1]


@dataclass(slots=True)
class PrefillCall:
    """attention_prefill: out, query [B, Q, H, D]; key, value [B, P, Hkv, D]; query i is column P - Q + i."""

    out: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    seq_start: torch.Tensor
    scale: float
    span: int  # the keys a query attends to at most, itself included (window_span)

    @property
    def queries(self) -> int:
        return self.query.shape[1]

    @property
    def columns(self) -> int:
        return self.key.shape[1]


@dataclass(slots=True)
class DecodeCall:
    """segment_attention_decode with its lengths resolved: prompt_len is the prompt-segment columns to
    attend, or their capacity where segment_lens holds the lengths on the device."""

    out: torch.Tensor  # [S, H, D]
    query: torch.Tensor
    prompt: KVTensors  # [R, Hkv, P, D], or a pool of blocks with block_table
    prompt_start: torch.Tensor  # int32 [R]
    response: KVTensors  # [S, Hkv, C, D]
    beam_slots: torch.Tensor  # int32 [S, >= response_len]
    response_len: int
    scale: float
    kv_dtype: str
    segment_lens: torch.Tensor | None
    block_table: torch.Tensor | None
    prompt_len: int
    span: int
    rings: tuple[bool, bool]  # whether the prompt and the response segment may be attended past their columns

    @property
    def requests(self) -> int:
        return self.prompt_start.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.prompt[0].shape[1]

    @property
    def beams(self) -> int:
        return self.query.shape[0] // self.requests

    @property
    def group(self) -> int:
        return self.query.shape[1] // self.kv_heads

    @property
    def head_dim(self) -> int:
        return self.query.shape[2]

    def host_lengths(self) -> tuple[int, int]:
        """(prompt columns, response steps) to attend, read on the host (a wait for the device where
        segment_lens holds them): within the capacities, each unless its segment is a ring."""
        if self.segment_lens is None:
            return self.prompt_len, self.response_len
        capacities = (self.prompt_len, self.response_len)
        lengths = tuple(int(n) for n in self.segment_lens.tolist())
        if not all(
            length >= 0 and (ring or length <= capacity)
            for length, capacity, ring in zip(lengths, capacities, self.rings, strict=True)
        ):
            raise ValueError(
                f"segment_attention_decode: segment_lens {lengths} exceed the segments' capacities {capacities} "
                "(more only as rings, under a window of at most their columns)"
            )
        return lengths


# --- one validator per op ---------------------------------------------------------------------------


def rms_norm(
    limits: Limits, out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> NormCall:
    op = "rms_norm"
    activation_dtype(op, limits.backend, input, out, weight)
    _norm_rows(op, limits, input, weight, "out", out)
    return NormCall(rows(op, "out", out), rows(op, "input", input), weight, epsilon)


def fused_add_rms_norm(
    limits: Limits, input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> AddNormCall:
    op = "fused_add_rms_norm"
    activation_dtype(op, limits.backend, input, residual, weight)
    _norm_rows(op, limits, input, weight, "residual", residual)
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
    _decode_layout(op, out, query, prompt_k, prompt_v, prompt_start, response_k, response_v, beam_slots)
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


# --- the checks they share, also used by the GEMMs' launchers (ops.md, "linear") -----------------------


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


def _norm_rows(
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


def _decode_layout(
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
