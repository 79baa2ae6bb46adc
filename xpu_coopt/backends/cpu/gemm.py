"""How the CPU backend runs its GEMMs: torch's own kernels, chosen per shape (not registered ops).

Measured on this project's CPU machines with weights streaming from DRAM (docs/benchmarks.md), bfloat16,
the 120 layer GEMMs of SmolLM2-135M per decode step:
- one row: torch's native GEMV 7.6 ms, oneDNN with a prepacked weight 11.9 ms, oneDNN plain 20.5 ms;
- 4 rows: prepacked 12.9 ms, plain 22.2 ms, native 23.9 ms; 16 rows: prepacked 15.7 ms, plain 28.5 ms.
So a weight xpu_coopt owns (the fused q/k/v and gate/up matrices) is packed once into oneDNN's blocked
layout (torch.ops.mkldnn._reorder_linear_weight, what torch.compile's CPU freezing uses) for several
rows, while a single row runs torch's native GEMV over the plain per-projection weights it was fused
from (shared with the transformers model, so they cost no memory). Weights shared with transformers
(o_proj, down_proj, LM head) stay plain by default: native GEMV for one row, oneDNN otherwise. With
optimize(pack_shared_weights=True) they get a packed copy too (held next to the shared plain weight, which
single rows keep using): 4- and 16-row GEMMs over them ~1.6-2.5x faster, for a second copy of them.
On a CPU where oneDNN has no bfloat16 kernels (AVX2 only) nothing is packed, and GEMMs of FLOAT32_MIN_ROWS
rows or more run in float32 (matmul_dtype).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Where oneDNN has no kernels for a 16-bit dtype (matmul_dtype), torch's fallback GEMM is slower than
# float32 from 8 rows on, the weight's conversion at every call included (AVX2, SmolLM2-135M's gate/up:
# 16 rows 3.9 -> 1.7 ms, a 1024-token prefill's 227 -> 33 ms); fewer rows stay 16-bit, bound by the reads.
FLOAT32_MIN_ROWS = 16

# Such float32 GEMMs convert the weight at most this many bytes at a time (_linear_in_slices), so a large
# weight is not copied whole into fresh pages at every call. AVX2, 2 threads, SmolLM2-135M's LM head
# [49152, 576] (113 MB in float32), medians of 8 calls, three runs: 16 rows 101-109 ms converted whole,
# 20-31 ms in slices; 64 rows 110-183 -> 37-142 ms; a 1024-row prefill 862-933 -> 509-685 ms. Gate/up
# [3072, 576] (7 MB, two slices): 16 rows 2.0-5.1 -> 1.3-3.3 ms. Weights of 4 MB or less convert whole.
CONVERTED_SLICE_BYTES = 4 << 20


@dataclass(frozen=True)
class PackedWeight:
    """A [out_features, in_features] weight in oneDNN's blocked layout (opaque: only linear() reads it).

    parts: plain weights whose rows, concatenated, equal the packed matrix (the projections it was fused
    from); single rows run on them. Empty when they are not in the packed dtype.
    """

    packed: torch.Tensor
    out_features: int
    parts: tuple[torch.Tensor, ...] = ()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.packed, *self.parts)


@functools.cache
def _cpu_has_bfloat16_gemms() -> bool:
    """Whether oneDNN runs bfloat16 GEMMs on this CPU: it needs avx512bw, avx512vl and avx512dq or
    avx_ne_convert (an AVX2-only CPU has neither, and its packed GEMMs raise)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def _cpu_has_float16_gemms() -> bool:
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


def why_not_packable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why pack_weight leaves weights of this device and dtype plain, or None where it packs them."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return f"this model runs in {dtype} on {device.type}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN"
    if not _cpu_has_bfloat16_gemms():
        return f"oneDNN has no bfloat16 GEMMs on this CPU ({torch.backends.cpu.get_cpu_capability()})"
    return None


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype to run a matmul of `dtype` operands in: float32 on a CPU where oneDNN has no kernels for
    that 16-bit dtype, as torch's fallback there is many times slower (AVX2, measured: a [3, 12, 1024] x
    [3, 1024, 64] attention matmul 11x float32's in bfloat16, including the conversions)."""
    if device.type != "cpu":
        return dtype
    if dtype == torch.bfloat16 and not _cpu_has_bfloat16_gemms():
        return torch.float32
    if dtype == torch.float16 and not _cpu_has_float16_gemms():
        return torch.float32
    return dtype


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether pack_weight packs weights of this device and dtype (bfloat16 on CPU, with oneDNN)."""
    return why_not_packable(device, dtype) is None


def pack_weight(weight: torch.Tensor, parts: tuple[torch.Tensor, ...] = ()) -> torch.Tensor | PackedWeight:
    """The weight in the form linear() runs fastest. parts: the plain matrices it was concatenated from."""
    if not can_pack(weight.device, weight.dtype):
        return weight
    usable_parts = tuple(parts) if all(p.dtype == weight.dtype for p in parts) else ()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    return PackedWeight(packed, weight.shape[0], usable_parts)


def _native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def linear(
    x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias for plain or packed weights."""
    single_row = x.numel() == x.shape[-1]
    if isinstance(weight, PackedWeight):
        if single_row and weight.parts:
            biases = (
                bias.split([p.shape[0] for p in weight.parts])
                if bias is not None
                else [None] * len(weight.parts)
            )
            return torch.cat([_native(x, p, b) for p, b in zip(weight.parts, biases, strict=True)], dim=-1)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, weight.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.out_features)
    if single_row and x.device.type == "cpu" and x.dtype != torch.float32:
        return _native(x, weight, bias)
    compute = matmul_dtype(x.device, x.dtype)
    if compute != x.dtype and x.numel() >= FLOAT32_MIN_ROWS * x.shape[-1]:
        return _linear_in_slices(x, weight, bias, compute)
    return F.linear(x, weight, bias)


def _linear_in_slices(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype
) -> torch.Tensor:
    """linear() computed in `compute`, the weight converted at most CONVERTED_SLICE_BYTES at a time (a slice
    of its output features): each slice is multiplied while it is still in cache, and its memory is reused
    rather than a whole converted weight's fresh pages mapped at every call."""
    rows = x.reshape(-1, x.shape[-1]).to(compute)
    out_features = weight.shape[0]
    step = max(1, CONVERTED_SLICE_BYTES // (weight.shape[1] * compute.itemsize))
    if step >= out_features:  # one slice: the whole weight
        bias = None if bias is None else bias.to(compute)
        return F.linear(rows, weight.to(compute), bias).to(x.dtype).view(*x.shape[:-1], out_features)
    out = torch.empty((rows.shape[0], out_features), dtype=x.dtype, device=x.device)
    for first in range(0, out_features, step):
        features = slice(first, first + step)
        part_bias = None if bias is None else bias[features].to(compute)
        out[:, features] = F.linear(rows, weight[features].to(compute), part_bias)
    return out.view(*x.shape[:-1], out_features)
