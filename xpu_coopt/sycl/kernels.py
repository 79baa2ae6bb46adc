"""The SYCL implementation of every op in xpu_coopt/ops/schema.py (contracts: docs/ops.md).

Each function checks what its kernel supports (dtype, head_dim, layout) with a clear error, picks the
kernel instantiated for the dtype and KV format, and launches it on the queue of the tensors' device.
They are registered as the ops' XPU kernels; backend="sycl" also calls them directly on CPU tensors.
"""

from __future__ import annotations

from ctypes import c_float, c_int, c_int64
from types import SimpleNamespace

import torch

from xpu_coopt.ops.schema import KV_FORMATS, library
from xpu_coopt.sycl.runtime import queue_for

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
SUB_GROUP = 16  # sycl_kernels/common.hpp kSubGroup
MAX_HEAD_DIM = 128  # common.hpp kMaxHeadDim
MAX_DECODE_ROWS = 32  # segment_attention_decode.cpp kMaxRows: beams x query heads per KV head
PREFILL_QUERY_ROWS = 8  # attention_prefill.cpp kQueryRows
NORM_WORK_GROUP = 128
ELEMENTWISE_WORK_GROUP = 256
KV_WRITE_WORK_GROUP = 4 * SUB_GROUP


def _dtype_name(op: str, *tensors: torch.Tensor) -> str:
    dtype = tensors[0].dtype
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"{op}: the SYCL kernels take float32, float16 or bfloat16 activations, not {dtype}")
    for tensor in tensors[1:]:
        if tensor.dtype != dtype:
            raise TypeError(f"{op}: all activations must share one dtype, got {dtype} and {tensor.dtype}")
    return DTYPE_NAMES[dtype]


def _kernel_suffix(op: str, kv_format: str, *tensors: torch.Tensor) -> str:
    if kv_format not in KV_FORMATS:
        raise ValueError(f"{op}: unknown kv_format {kv_format!r}; choose one of {KV_FORMATS}")
    return f"{_dtype_name(op, *tensors)}_{kv_format}"


def _check_head_dim(op: str, head_dim: int) -> None:
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: the SYCL kernels support even head_dim up to {MAX_HEAD_DIM}, not {head_dim}")


def _check_inner_contiguous(op: str, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in its last dimension")


def _rows(op: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A [..., width] tensor as a [rows, width] view (any row stride)."""
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError as error:
        raise ValueError(f"{op}: {name} must be viewable as [rows, {tensor.shape[-1]}]: {error}") from None


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
    _check_inner_contiguous("rms_norm", out=out, input=input, weight=weight)
    out2, input2 = _rows("rms_norm", "out", out), _rows("rms_norm", "input", input)
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
    _check_inner_contiguous("fused_add_rms_norm", input=input, residual=residual, weight=weight)
    input2 = _rows("fused_add_rms_norm", "input", input)
    residual2 = _rows("fused_add_rms_norm", "residual", residual)
    if input2.shape[0] == 0:
        return
    _run(
        input.device, "norms.cpp", f"fused_add_rms_norm_{name}", input2.shape[0] * NORM_WORK_GROUP, NORM_WORK_GROUP,
        input2, residual2, weight, c_float(epsilon), c_int(input2.shape[1]),
        c_int64(input2.stride(0)), c_int64(residual2.stride(0)),
    )  # fmt: skip


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    name = _dtype_name("silu_and_mul", input, out)
    _check_inner_contiguous("silu_and_mul", out=out, input=input)
    out2, input2 = _rows("silu_and_mul", "out", out), _rows("silu_and_mul", "input", input)
    rows, width = out2.shape
    if rows * width == 0:
        return
    _run(
        input.device, "norms.cpp", f"silu_and_mul_{name}",
        _round_up(rows * width, ELEMENTWISE_WORK_GROUP), ELEMENTWISE_WORK_GROUP,
        out2, input2, c_int64(rows), c_int(width), c_int64(out2.stride(0)), c_int64(input2.stride(0)),
    )  # fmt: skip


def _cache_layout(
    op: str,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> list[c_int64]:
    """(row, head, position) strides of the caches, then of the scales; K and V must share them."""
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"{op}: k_cache and v_cache must have the same strides")
    if (k_scale is None) != (v_scale is None) or (
        k_scale is not None and k_scale.stride() != v_scale.stride()
    ):
        raise ValueError(f"{op}: k_scale and v_scale must both be given, with the same strides")
    scale_strides = k_scale.stride() if k_scale is not None else (0, 0, 0)
    return [c_int64(s) for s in (*k_cache.stride()[:3], *scale_strides[:3])]


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
    kv_format: str,
    *,
    op: str = "rotary_embedding_kv_write",
) -> None:
    """One kernel serves both ops: without query and cos_sin it only writes the cache (kv_write)."""
    rotate = query is not None
    activations = (key, value) + ((query, cos_sin) if rotate else ())
    suffix = _kernel_suffix(op, kv_format, *activations)
    if kv_format == "auto" and k_cache.dtype != key.dtype:
        raise TypeError(f"{op}: a kv_format='auto' cache must have the activation dtype {key.dtype}")
    tokens, kv_heads, head_dim = key.shape
    _check_head_dim(op, head_dim)
    _check_inner_contiguous(op, key=key, value=value, k_cache=k_cache, v_cache=v_cache, cos_sin=cos_sin)
    for name, tensor in {"query": query, "key": key, "value": value}.items():
        if tensor is not None and tensor.stride(1) != head_dim:
            raise ValueError(f"{op}: the heads of {name} must be head_dim apart")
    if cache_rows.dtype != torch.int64 or cache_positions.dtype != torch.int64:
        raise TypeError(f"{op}: cache_rows and cache_positions must be int64")
    if tokens == 0:
        return
    _run(
        key.device, "kv_write.cpp", f"rotary_kv_write_{suffix}", tokens * KV_WRITE_WORK_GROUP, KV_WRITE_WORK_GROUP,
        query, key, value, cos_sin, k_cache, v_cache, k_scale, v_scale,
        cache_rows.contiguous(), cache_positions.contiguous(), c_int(int(rotate)),
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
    kv_format: str,
) -> None:
    rotary_embedding_kv_write(
        None, key, value, None, k_cache, v_cache, k_scale, v_scale, cache_rows, cache_positions, kv_format,
        op="kv_write",
    )  # fmt: skip


def attention_prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_start: torch.Tensor,
    scale: float,
) -> None:
    op = "attention_prefill"
    name = _dtype_name(op, query, key, value, out)
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    _check_head_dim(op, head_dim)
    _check_inner_contiguous(op, out=out, query=query, key=key, value=value)
    for tensor_name, tensor in {"out": out, "query": query, "key": key, "value": value}.items():
        if tensor.stride(2) != head_dim:
            raise ValueError(f"{op}: the heads of {tensor_name} must be head_dim apart")
    if batch * length == 0:
        return
    work_groups = batch * heads * -(-length // PREFILL_QUERY_ROWS)
    local = PREFILL_QUERY_ROWS * SUB_GROUP
    _run(
        query.device, "attention_prefill.cpp", f"attention_prefill_{name}", work_groups * local, local,
        out, query, key, value, seq_start.to(torch.int32).contiguous(), c_int(length), c_int(heads),
        c_int(kv_heads), c_int(head_dim), c_float(scale),
        *(c_int64(s) for t in (query, key, value, out) for s in t.stride()[:2]),
    )  # fmt: skip


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
    op = "segment_attention_decode"
    suffix = _kernel_suffix(op, kv_format, query, out)
    num_seqs, heads, head_dim = query.shape
    requests, kv_heads, prompt_len, _ = prompt_k.shape
    beams, group = num_seqs // requests, heads // kv_heads
    _check_head_dim(op, head_dim)
    if beams * group > MAX_DECODE_ROWS:
        raise ValueError(
            f"{op}: beams x query heads per KV head = {beams} x {group} exceeds the {MAX_DECODE_ROWS} rows "
            "one SYCL work-group serves"
        )
    _check_inner_contiguous(op, out=out, query=query, prompt_k=prompt_k, prompt_v=prompt_v)
    _check_inner_contiguous(op, response_k=response_k, response_v=response_v, beam_slots=beam_slots)
    if query.stride(1) != head_dim or out.stride(1) != head_dim:
        raise ValueError(f"{op}: the heads of query and out must be head_dim apart")
    if beam_slots.dtype != torch.int32:
        raise TypeError(f"{op}: beam_slots must be int32")
    _run(
        query.device, "segment_attention_decode.cpp", f"segment_attention_decode_{suffix}",
        requests * kv_heads * beams * group * SUB_GROUP, beams * group * SUB_GROUP,
        out, query, prompt_k, prompt_v, prompt_k_scale, prompt_v_scale, prompt_start.to(torch.int32).contiguous(),
        response_k, response_v, response_k_scale, response_v_scale, beam_slots,
        c_int(beams), c_int(kv_heads), c_int(group), c_int(head_dim), c_int(prompt_len), c_int(response_len),
        c_float(scale), c_int64(query.stride(0)), c_int64(out.stride(0)),
        *_cache_layout(op, prompt_k, prompt_v, prompt_k_scale, prompt_v_scale),
        *_cache_layout(op, response_k, response_v, response_k_scale, response_v_scale),
        c_int64(beam_slots.stride(0)),
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
