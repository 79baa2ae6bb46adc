"""The call records the validators return (validate.py) and the kernels take: one per op, holding the
call's tensors as the kernels read them (row views, resolved lengths) and the shapes derived from them;
and Limits, what a backend states it supports beyond the contract."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


@dataclass(slots=True)
class PagedCall:
    """paged_attention: out, query [T, H, D]; k_pool, v_pool [blocks, Hkv, block_size, D] (scales
    [blocks, Hkv, block_size] for FP8); block_tables int32 [S, N]; query_start int32 [S + 1];
    context_lens int32 [S]."""

    out: torch.Tensor
    query: torch.Tensor
    pool: KVTensors
    block_tables: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    scale: float
    kv_dtype: str
    span: int  # the keys a query attends to at most, itself included (window_span)

    @property
    def block_size(self) -> int:
        return self.pool[0].shape[2]
