"""The SYCL implementation of every op in xpu_coopt/ops/schema.py (contracts: docs/ops.md).

Each function checks what its kernel supports (dtype, head_dim, layout) with a clear error, picks the
kernel instantiated for the dtype and KV format, and launches it on the queue of the tensors' device.
They are registered as the ops' XPU kernels; backend="sycl" also calls them directly on CPU tensors.
"""

from __future__ import annotations

from ctypes import c_float, c_int, c_int64
from types import SimpleNamespace

import torch

from xpu_coopt.backends.sycl.runtime import queue_for
from xpu_coopt.ops import decode_split, validate
from xpu_coopt.ops.schema import NO_WINDOW, library

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
NORM_WORK_GROUP = 128
ELEMENTWISE_WORK_GROUP = 256
KV_WRITE_WORK_GROUP = 4 * SUB_GROUP


def _dtype_name(op: str, *tensors: torch.Tensor) -> str:
    return DTYPE_NAMES[validate.activation_dtype(op, "SYCL", *tensors)]


def _kernel_suffix(op: str, kv_dtype: str, *tensors: torch.Tensor) -> str:
    return f"{_dtype_name(op, *tensors)}_{validate.kv_dtype(op, kv_dtype)}"


def _check_head_dim(op: str, head_dim: int) -> None:
    validate.head_dim(op, "SYCL", head_dim, MAX_HEAD_DIM)


def _cache_layout(op: str, *cache_and_scales: torch.Tensor | None) -> list[c_int64]:
    return [c_int64(s) for s in validate.cache_strides(op, *cache_and_scales)]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _run(device: torch.device, source: str, name: str, global_size: int, local_size: int, *arguments) -> None:
    """Launches kernel `name` of sycl_kernels/`source` on the queue for `device`; on a synchronous (CPU)
    queue, returns when it is done, while `arguments` still holds every temporary tensor it reads."""
    queue = queue_for(device)
    queue.launch(queue.kernel(source, name), global_size, local_size, arguments)
    queue.finish()


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    name = _dtype_name("rms_norm", input, out, weight)
    validate.inner_contiguous("rms_norm", out=out, input=input, weight=weight)
    out2, input2 = validate.rows("rms_norm", "out", out), validate.rows("rms_norm", "input", input)
    if input2.shape[0] == 0:
        return
    _run(
        input.device, "norms.cpp", f"rms_norm_{name}", input2.shape[0] * NORM_WORK_GROUP, NORM_WORK_GROUP,
        out2, input2, weight, c_float(epsilon), c_int(input2.shape[1]), c_int64(out2.stride(0)), c_int64(input2.stride(0)),
    )  # fmt: skip


def fused_add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> None:
    name = _dtype_name("fused_add_rms_norm", input, residual, weight)
    validate.inner_contiguous("fused_add_rms_norm", input=input, residual=residual, weight=weight)
    input2 = validate.rows("fused_add_rms_norm", "input", input)
    residual2 = validate.rows("fused_add_rms_norm", "residual", residual)
    if input2.shape[0] == 0:
        return
    _run(
        input.device, "norms.cpp", f"fused_add_rms_norm_{name}", input2.shape[0] * NORM_WORK_GROUP, NORM_WORK_GROUP,
        input2, residual2, weight, c_float(epsilon), c_int(input2.shape[1]),
        c_int64(input2.stride(0)), c_int64(residual2.stride(0)),
    )  # fmt: skip


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    name = _dtype_name("silu_and_mul", input, out)
    validate.inner_contiguous("silu_and_mul", out=out, input=input)
    out2, input2 = validate.rows("silu_and_mul", "out", out), validate.rows("silu_and_mul", "input", input)
    rows, width = out2.shape
    if rows * width == 0:
        return
    _run(
        input.device, "norms.cpp", f"silu_and_mul_{name}",
        _round_up(rows * width, ELEMENTWISE_WORK_GROUP), ELEMENTWISE_WORK_GROUP,
        out2, input2, c_int64(rows), c_int(width), c_int64(out2.stride(0)), c_int64(input2.stride(0)),
    )  # fmt: skip


def rotary_embedding_kv_write(
    query: torch.Tensor | None,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    cache_rows: torch.Tensor,
    cache_positions: torch.Tensor,
    kv_dtype: str,
    static_scale: bool = False,
    *,
    op: str = "rotary_embedding_kv_write",
) -> None:
    """One kernel serves both ops: without query and cos_sin it only writes the cache (kv_write)."""
    rotate = query is not None
    activations = (key, value) + ((query, cos_sin) if rotate else ())
    suffix = _kernel_suffix(op, kv_dtype, *activations)
    validate.cache_write(op, kv_dtype, key, k_cache, static_scale)
    tokens, kv_heads, head_dim = key.shape
    _check_head_dim(op, head_dim)
    validate.inner_contiguous(op, key=key, value=value, k_cache=k_cache, v_cache=v_cache, cos_sin=cos_sin)
    validate.heads_apart(op, head_dim, 1, query=query, key=key, value=value)
    validate.index_dtype(op, torch.int64, cache_rows=cache_rows, cache_positions=cache_positions)
    if tokens == 0:
        return
    _run(
        key.device, "kv_write.cpp", f"rotary_kv_write_{suffix}", tokens * KV_WRITE_WORK_GROUP, KV_WRITE_WORK_GROUP,
        query, key, value, cos_sin, k_cache, v_cache, k_scale, v_scale,
        cache_rows.contiguous(), cache_positions.contiguous(), c_int(int(rotate)), c_int(int(static_scale)),
        c_int(query.shape[1] if rotate else 0), c_int(kv_heads), c_int(head_dim),
        c_int64(query.stride(0) if rotate else 0), c_int64(key.stride(0)), c_int64(value.stride(0)),
        c_int64(cos_sin.stride(0) if rotate else 0),
        *_cache_layout(op, k_cache, v_cache, k_scale, v_scale),
    )  # fmt: skip


def kv_write(
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
) -> None:
    rotary_embedding_kv_write(
        None, key, value, None, k_cache, v_cache, k_scale, v_scale, cache_rows, cache_positions, kv_dtype,
        static_scale, op="kv_write",
    )  # fmt: skip


def attention_prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_start: torch.Tensor,
    scale: float,
    window: int = NO_WINDOW,
) -> None:
    op = "attention_prefill"
    name = _dtype_name(op, query, key, value, out)
    span = validate.window_span(op, window)
    queries, columns = validate.prefill_shapes(op, out, query, key, value, seq_start)
    batch, _, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    _check_head_dim(op, head_dim)
    validate.inner_contiguous(op, out=out, query=query, key=key, value=value)
    validate.heads_apart(op, head_dim, 2, out=out, query=query, key=key, value=value)
    if batch * queries == 0:
        return
    work_groups = batch * heads * -(-queries // PREFILL_QUERY_ROWS)
    local = PREFILL_QUERY_ROWS * SUB_GROUP
    _run(
        query.device, "attention_prefill.cpp", f"attention_prefill_{name}", work_groups * local, local,
        out, query, key, value, seq_start.to(torch.int32).contiguous(), c_int(queries), c_int(columns),
        c_int(heads), c_int(kv_heads), c_int(head_dim), c_float(scale), c_int(span),
        *(c_int64(s) for t in (query, key, value, out) for s in t.stride()[:2]),
    )  # fmt: skip


def decode_splits(pairs: int, columns: int, device: torch.device) -> int:
    """Splits of the prompt columns for `pairs` (request, KV head, row chunk) work-groups
    (decode_split.split_prompt); the kernel shares out each request's tiles after its padding among them."""
    if device.type == "xpu":
        to_fill, min_chunk = torch.xpu.get_device_properties(device).gpu_eu_count, XPU_MIN_CHUNK
    else:
        to_fill, min_chunk = CPU_DEVICE_DECODE_WORK_GROUPS, DECODE_KEY_TILE
    return decode_split.split_prompt(pairs, columns, to_fill, min_chunk, DECODE_KEY_TILE)


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
    kv_dtype: str,
    segment_lens: torch.Tensor | None = None,
    prompt_block_table: torch.Tensor | None = None,
    prompt_len: int = -1,
    window: int = NO_WINDOW,
) -> None:
    op = "segment_attention_decode"
    suffix = _kernel_suffix(op, kv_dtype, query, out)
    span = validate.window_span(op, window)
    capacity = validate.prompt_capacity(op, prompt_k, prompt_start, prompt_block_table, prompt_len, span)
    # segment_lens read on the host: no graph capture on this backend.
    rings = validate.rings(prompt_k, prompt_block_table, response_k, span)
    prompt_len, response_len = validate.host_segment_lens(op, segment_lens, capacity, response_len, rings)
    if prompt_block_table is not None and prompt_k.shape[2] % DECODE_KEY_TILE:
        raise ValueError(
            f"{op}: the SYCL kernel reads a paged prompt segment in tiles of {DECODE_KEY_TILE} columns, so its "
            f"blocks must hold a multiple of {DECODE_KEY_TILE}, not {prompt_k.shape[2]}"
        )
    num_seqs, heads, head_dim = query.shape
    requests, kv_heads = prompt_start.shape[0], prompt_k.shape[1]
    beams, group = num_seqs // requests, heads // kv_heads
    _check_head_dim(op, head_dim)
    validate.inner_contiguous(op, out=out, query=query, prompt_k=prompt_k, prompt_v=prompt_v)
    validate.inner_contiguous(op, response_k=response_k, response_v=response_v, beam_slots=beam_slots)
    validate.heads_apart(op, head_dim, 1, query=query, out=out)
    validate.index_dtype(op, torch.int32, beam_slots=beam_slots)
    if num_seqs == 0:
        return
    chunks = decode_split.chunk_rows(beams, group, MAX_DECODE_ROWS)
    splits = decode_splits(requests * kv_heads * chunks.chunks, min(prompt_len, span), query.device)
    rows = num_seqs * heads
    # Partials of a split decode (workspace of this call, read by combine_splits); one split writes out.
    partial_acc = partial_stats = None
    if splits > 1:
        partial_acc = query.new_empty((splits, rows, head_dim), dtype=torch.float32)
        partial_stats = query.new_empty((splits, rows, 2), dtype=torch.float32)
    _run(
        query.device, "segment_attention_decode.cpp",
        f"segment_attention_decode_{suffix}_r{next(r for r in DECODE_ROWS if chunks.rows <= r)}",
        requests * kv_heads * chunks.chunks * splits * chunks.rows * SUB_GROUP, chunks.rows * SUB_GROUP,
        out, query, prompt_k, prompt_v, prompt_k_scale, prompt_v_scale, prompt_start.to(torch.int32).contiguous(),
        response_k, response_v, response_k_scale, response_v_scale, beam_slots,
        c_int(beams), c_int(kv_heads), c_int(group), c_int(chunks.chunks), c_int(chunks.rows), c_int(head_dim), c_int(prompt_len), c_int(response_len),
        c_int(max(1, response_k.shape[2])), c_int(span), c_float(scale), c_int64(query.stride(0)), c_int64(out.stride(0)),
        *_cache_layout(op, prompt_k, prompt_v, prompt_k_scale, prompt_v_scale),
        *_cache_layout(op, response_k, response_v, response_k_scale, response_v_scale),
        c_int64(beam_slots.stride(0)), prompt_block_table,
        c_int64(0 if prompt_block_table is None else prompt_block_table.stride(0)), c_int(prompt_k.shape[2]),
        c_int(splits), c_int64(rows), partial_acc, partial_stats,
    )  # fmt: skip
    if splits > 1:
        _run(
            query.device, "segment_attention_decode.cpp", f"combine_splits_{_dtype_name(op, out)}",
            rows * SUB_GROUP, SUB_GROUP,
            out, partial_acc, partial_stats, c_int(splits), c_int64(rows), c_int(heads), c_int(head_dim),
            c_int64(out.stride(0)),
        )  # fmt: skip


KERNELS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_embedding_kv_write": rotary_embedding_kv_write,
    "kv_write": kv_write,
    "attention_prefill": attention_prefill,
    "segment_attention_decode": segment_attention_decode,
}


def sycl_kernels() -> SimpleNamespace:
    """The SYCL kernels as plain functions: what backend="sycl" calls, on xpu or cpu tensors."""
    return SimpleNamespace(**KERNELS)


for _name, _kernel in KERNELS.items():
    library().impl(_name, _kernel, "XPU")
