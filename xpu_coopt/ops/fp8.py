"""FP8 KV-cache codecs: uint8 codes with one bfloat16 scale per (token, KV head).

Codes are the bit patterns of torch.float8_e4m3fn / torch.float8_e5m2, stored as uint8 so every backend
(SYCL in particular, whose FP8 types crash the SPIR-V writer) handles them as plain bytes.
Scales are dynamic: scale = amax(|x|) / FP8_MAX over head_dim, rounded up to a bfloat16 value, so the
largest element maps to (just under) the largest finite code. bfloat16 scales keep a head_dim-64 row at
66 bytes (0.516x of bf16) where a float32 scale would need 68 (0.531x); rounding the scale up and encoding
with the rounded value keeps encode and decode consistent, at no measurable cost (docs/accuracy.md).
Out-of-range values saturate to the largest finite code: never NaN or inf.
"""

from __future__ import annotations

import torch

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {name: torch.finfo(dtype).max for name, dtype in FP8_DTYPES.items()}

# Scales are stored in this dtype, in tensors shaped like the cache without head_dim.
SCALE_DTYPE = torch.bfloat16
# A scale of exactly zero would turn the decode into 0 * code; an all-zero row is stored with this scale.
MIN_SCALE = 1e-12


def is_fp8(kv_dtype: str) -> bool:
    return kv_dtype in FP8_DTYPES


def encode(x: torch.Tensor, scale: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """x: [..., D] any float dtype; scale: [...] float32 -> uint8 codes [..., D] (saturating)."""
    limit = FP8_MAX[kv_dtype]
    scaled = (x.float() / scale.float().unsqueeze(-1)).clamp(-limit, limit)
    return scaled.to(FP8_DTYPES[kv_dtype]).view(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, kv_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    """codes: uint8 [..., D]; scale: [...] float32 -> values [..., D] in dtype."""
    values = codes.view(FP8_DTYPES[kv_dtype]).float() * scale.float().unsqueeze(-1)
    return values.to(dtype)


def round_up_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """Positive float32 values rounded up to the next bfloat16 value (still float32): clear the low 16
    bits after adding 0xFFFF, the same bit operation every backend uses."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & -0x10000).view(torch.float32)


def dynamic_scale(x: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """Per-row scale over the last dim: x [..., D] -> float32 [...], each a bfloat16 value."""
    amax = x.detach().abs().amax(dim=-1).float()
    return round_up_to_bfloat16((amax / FP8_MAX[kv_dtype]).clamp_min(MIN_SCALE))
