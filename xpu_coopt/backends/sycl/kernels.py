"""The SYCL implementation of every op in xpu_coopt/ops/schema.py (contracts: docs/ops.md).

Each kernel takes its op's validated call (ops/validate.py; LIMITS states what the SYCL kernels support
beyond the contract), picks the kernel instantiated for the dtype and KV format, and launches it on the
queue of the tensors' device. They are registered as the ops' XPU kernels; backend="sycl" also calls
them directly on CPU tensors.
"""

from __future__ import annotations

import sys
from ctypes import c_float, c_int, c_int64
from types import SimpleNamespace

import torch

from xpu_coopt.backends.sycl.runtime import queue_for
from xpu_coopt.ops import checks, decode_split
from xpu_coopt.ops.calls import (
    AddNormCall,
    DecodeCall,
    KVWriteCall,
    Limits,
    NormCall,
    PagedCall,
    PrefillCall,
    SiluCall,
)
from xpu_coopt.ops.registry import register_backend

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
SUB_GROUP = 16  # sycl_kernels/common.hpp kSubGroup
MAX_HEAD_DIM = 128  # common.hpp kMaxHeadDim
# segment_attention_decode.cpp: rows (beams x query heads per KV head) a work-group serves, in its two
# sizes (the smaller holds less local memory, so that more work-groups fit an Xe-core); more rows are
# shared out among work-groups (decode_split.chunk_rows)
DECODE_ROWS = (4, 32)
MAX_DECODE_ROWS = DECODE_ROWS[-1]
DECODE_KEY_TILE = 16  # attention.hpp kKeyTile: the prompt columns a split covers are a multiple of it
# Split decoding on an Intel GPU aims for one work-group per vector engine (XVE) in all, and gives a split
# at least XPU_MIN_CHUNK prompt columns: its partials cost 130 floats a row to write and combine, where 64
# columns of K and V are 32 KiB in 16 bits at head_dim 128. Estimates: not measured on an Intel GPU.
XPU_MIN_CHUNK = 64
# On the OpenCL CPU device (the tests): a fixed work-group count and one tile a split, so that the tests'
# small prompts run split decoding too.
CPU_DEVICE_DECODE_WORK_GROUPS = 16
PREFILL_QUERY_ROWS = 8  # attention_prefill.cpp kQueryRows
PAGED_QUERY_ROWS = 8  # paged_attention.cpp kQueryRows
NORM_WORK_GROUP = 128
ELEMENTWISE_WORK_GROUP = 256
KV_WRITE_WORK_GROUP = 4 * SUB_GROUP
LIMITS = Limits("SYCL", max_head_dim=MAX_HEAD_DIM, block_multiple=DECODE_KEY_TILE)


def _dtype_name(tensor: torch.Tensor) -> str:
    return DTYPE_NAMES[tensor.dtype]


def _strides(strides: tuple[int, ...]) -> list[c_int64]:
    return [c_int64(s) for s in strides]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _run(device: torch.device, source: str, name: str, global_size: int, local_size: int, *arguments) -> None:
    """Launches kernel `name` of sycl_kernels/`source` on the queue for `device`; on a synchronous (CPU)
    queue, returns when it is done, while `arguments` still holds every temporary tensor it reads."""
    queue = queue_for(device)
    queue.launch(queue.kernel(source, name), global_size, local_size, arguments)
    queue.finish()


def rms_norm(call: NormCall) -> None:
    out, input = call.out, call.input
    if input.shape[0] == 0:
        return
    _run(
        input.device, "norms.cpp", f"rms_norm_{_dtype_name(input)}", input.shape[0] * NORM_WORK_GROUP, NORM_WORK_GROUP,
        out, input, call.weight, c_float(call.epsilon), c_int(input.shape[1]), c_int64(out.stride(0)),
        c_int64(input.stride(0)),
    )  # fmt: skip


def fused_add_rms_norm(call: AddNormCall) -> None:
    input, residual = call.input, call.residual
    if input.shape[0] == 0:
        return
    _run(
        input.device, "norms.cpp", f"fused_add_rms_norm_{_dtype_name(input)}", input.shape[0] * NORM_WORK_GROUP,
        NORM_WORK_GROUP, input, residual, call.weight, c_float(call.epsilon), c_int(input.shape[1]),
        c_int64(input.stride(0)), c_int64(residual.stride(0)),
    )  # fmt: skip


def silu_and_mul(call: SiluCall) -> None:
    out, input = call.out, call.input
    rows, width = out.shape
    if rows * width == 0:
        return
    _run(
        input.device, "norms.cpp", f"silu_and_mul_{_dtype_name(input)}",
        _round_up(rows * width, ELEMENTWISE_WORK_GROUP), ELEMENTWISE_WORK_GROUP,
        out, input, c_int64(rows), c_int(width), c_int64(out.stride(0)), c_int64(input.stride(0)),
    )  # fmt: skip


def rotary_embedding_kv_write(call: KVWriteCall) -> None:
    """One kernel serves both ops: without query and cos_sin it only writes the cache (kv_write)."""
    query, key, value, cos_sin = call.query, call.key, call.value, call.cos_sin
    tokens, kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    rotate = query is not None
    _run(
        key.device, "kv_write.cpp", f"rotary_kv_write_{_dtype_name(key)}_{call.kv_dtype}", tokens * KV_WRITE_WORK_GROUP,
        KV_WRITE_WORK_GROUP, query, key, value, cos_sin, *call.cache,
        call.cache_rows.contiguous(), call.cache_positions.contiguous(), c_int(int(rotate)), c_int(int(call.static_scale)),
        c_int(call.heads), c_int(kv_heads), c_int(head_dim),
        c_int64(query.stride(0) if rotate else 0), c_int64(key.stride(0)), c_int64(value.stride(0)),
        c_int64(cos_sin.stride(0) if rotate else 0), *_strides(call.strides),
    )  # fmt: skip


def attention_prefill(call: PrefillCall) -> None:
    query = call.query
    batch, queries, heads, head_dim = query.shape
    if batch * queries == 0:
        return
    work_groups = batch * heads * -(-queries // PREFILL_QUERY_ROWS)
    local = PREFILL_QUERY_ROWS * SUB_GROUP
    _run(
        query.device, "attention_prefill.cpp", f"attention_prefill_{_dtype_name(query)}", work_groups * local, local,
        call.out, query, call.key, call.value, call.seq_start.to(torch.int32).contiguous(), c_int(queries),
        c_int(call.columns), c_int(heads), c_int(call.key.shape[2]), c_int(head_dim), c_float(call.scale),
        c_int(call.span), *(c_int64(s) for t in (query, call.key, call.value, call.out) for s in t.stride()[:2]),
    )  # fmt: skip


def decode_splits(pairs: int, columns: int, device: torch.device) -> int:
    """Splits of the prompt columns for `pairs` (request, KV head, row chunk) work-groups
    (decode_split.split_prompt); the kernel shares out each request's tiles after its padding among them."""
    if device.type == "xpu":
        to_fill, min_chunk = torch.xpu.get_device_properties(device).gpu_eu_count, XPU_MIN_CHUNK
    else:
        to_fill, min_chunk = CPU_DEVICE_DECODE_WORK_GROUPS, DECODE_KEY_TILE
    return decode_split.split_prompt(pairs, columns, to_fill, min_chunk, DECODE_KEY_TILE)


def segment_attention_decode(call: DecodeCall) -> None:
    # segment_lens read on the host: no graph capture on this backend.
    prompt_len, response_len = call.host_lengths()
    query, out, response_k = call.query, call.out, call.response[0]
    num_seqs, heads, head_dim = query.shape
    if num_seqs == 0:
        return
    requests, kv_heads, table = call.requests, call.kv_heads, call.block_table
    chunks = decode_split.chunk_rows(call.beams, call.group, MAX_DECODE_ROWS)
    splits = decode_splits(requests * kv_heads * chunks.chunks, min(prompt_len, call.span), query.device)
    rows = num_seqs * heads
    # Partials of a split decode (workspace of this call, read by combine_splits); one split writes out.
    partial_acc = partial_stats = None
    if splits > 1:
        partial_acc = query.new_empty((splits, rows, head_dim), dtype=torch.float32)
        partial_stats = query.new_empty((splits, rows, 2), dtype=torch.float32)
    _run(
        query.device, "segment_attention_decode.cpp",
        f"segment_attention_decode_{_dtype_name(query)}_{call.kv_dtype}_r{next(r for r in DECODE_ROWS if chunks.rows <= r)}",
        requests * kv_heads * chunks.chunks * splits * chunks.rows * SUB_GROUP, chunks.rows * SUB_GROUP,
        out, query, *call.prompt[:2], *call.prompt[2:], call.prompt_start.to(torch.int32).contiguous(),
        *call.response, call.beam_slots,
        c_int(call.beams), c_int(kv_heads), c_int(call.group), c_int(chunks.chunks), c_int(chunks.rows), c_int(head_dim),
        c_int(prompt_len), c_int(response_len), c_int(max(1, response_k.shape[2])), c_int(call.span),
        c_float(call.scale), c_int64(query.stride(0)), c_int64(out.stride(0)),
        *_strides(checks.cache_strides("segment_attention_decode", *call.prompt)),
        *_strides(checks.cache_strides("segment_attention_decode", *call.response)),
        c_int64(call.beam_slots.stride(0)), table, c_int64(0 if table is None else table.stride(0)),
        c_int(call.prompt[0].shape[2]), c_int(splits), c_int64(rows), partial_acc, partial_stats,
    )  # fmt: skip
    if splits > 1:
        _run(
            query.device, "segment_attention_decode.cpp", f"combine_splits_{_dtype_name(out)}",
            rows * SUB_GROUP, SUB_GROUP,
            out, partial_acc, partial_stats, c_int(splits), c_int64(rows), c_int(heads), c_int(head_dim),
            c_int64(out.stride(0)),
        )  # fmt: skip


def paged_attention(call: PagedCall) -> None:
    """One launch a step (paged_attention.cpp), reading the blocks in place; the longest sequence's query
    count, read on the host, sizes the grid (no graph capture on this backend)."""
    query = call.query
    tokens, heads, head_dim = query.shape
    if tokens == 0:
        return
    query_tiles = -(-int((call.query_start[1:] - call.query_start[:-1]).max()) // PAGED_QUERY_ROWS)
    work_groups = call.context_lens.shape[0] * heads * query_tiles
    local = PAGED_QUERY_ROWS * SUB_GROUP
    k_pool, v_pool, k_scale, v_scale = call.pool
    scale_strides = [s for t in (k_scale, v_scale) for s in (t.stride()[:2] if t is not None else (0, 0))]
    _run(
        query.device, "paged_attention.cpp", f"paged_attention_{_dtype_name(query)}_{call.kv_dtype}",
        work_groups * local, local, call.out, query, k_pool, v_pool, k_scale, v_scale, call.block_tables,
        call.query_start, call.context_lens, c_int(query_tiles), c_int(heads), c_int(k_pool.shape[1]),
        c_int(head_dim), c_int(call.block_size), c_float(call.scale), c_int(call.span),
        *(c_int64(s) for s in (*query.stride()[:2], *call.out.stride()[:2], call.block_tables.stride(0))),
        *(c_int64(s) for s in (*k_pool.stride()[:3], *v_pool.stride()[:3], *scale_strides)),
    )  # fmt: skip


ENTRIES = register_backend(sys.modules[__name__], LIMITS, "XPU")


def sycl_kernels() -> SimpleNamespace:
    """The SYCL kernels' entries as plain functions: what backend="sycl" calls, on xpu or cpu tensors."""
    return ENTRIES
