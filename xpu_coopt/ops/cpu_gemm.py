"""How the CPU backend runs its GEMMs: torch's own kernels, chosen per shape (not registered ops).

Measured on this project's CPU machines (docs/benchmarks.md), bfloat16:
- oneDNN re-lays the weight out on every call; a weight packed once into oneDNN's blocked layout
  (torch.ops.mkldnn._reorder_linear_weight, what torch.compile's CPU freezing uses) runs 1.3-2x faster
  at 1 to 64 rows, with identical results. The backend packs the matrices xpu_coopt owns (the fused
  q/k/v and gate/up weights), never the ones it shares with the transformers model.
- For a single row against a plain (shared) weight, torch's native GEMV streams the weight about 2x
  faster than oneDNN's unpacked path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PackedWeight:
    """A [out_features, in_features] weight in oneDNN's blocked layout (opaque: only linear() reads it)."""

    packed: torch.Tensor
    out_features: int


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor | PackedWeight:
    """The weight in the form linear() runs fastest; packing needs a weight this process may re-lay out."""
    if not _can_pack(weight):
        return weight
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1), weight.shape[0])


def linear(
    x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias for plain or packed weights."""
    if isinstance(weight, PackedWeight):
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, weight.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.out_features)
    if x.device.type != "cpu" or x.dtype == torch.float32 or x.numel() != x.shape[-1]:
        return F.linear(x, weight, bias)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # one row: torch's native GEMV
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)
