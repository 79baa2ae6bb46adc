"""Round-to-nearest quantization of a 16-bit weight, as optimize(weight_dtype=...) applies it.

int4 (weight_dtype="int4", group_size=G): asymmetric, with an integer zero point per group (what
oneDNN's XPU W4A16 GEMM takes).
Per group of G columns of a row: scale = (max - min) / 15 rounded to float16 (as GPTQ and AWQ store
theirs), zero = round(-min / scale) in [0, 15], q = clamp(round(w / scale) + zero, 0, 15); the weight
becomes (q - zero) * scale. The Int4Weight's offset -zero * scale is exact in float32 (a 4-bit integer
times a float16), so its q * s + o is that value exactly.

int8 (weight_dtype="int8"): symmetric per channel (output feature), as torch's and oneDNN's W8A16 GEMMs
take it: scale = max |w| / 127 rounded to float16, q = clamp(round(w / scale), -128, 127).
"""

from __future__ import annotations

import torch

from xpu_coopt.quant.int4 import NIBBLE, Int4Weight
from xpu_coopt.quant.int8 import Int8Weight

LEVELS = 15  # the largest 4-bit code
INT8_LEVELS = 127  # the largest magnitude of a symmetric 8-bit code


def quantize_int4(weight: torch.Tensor, group_size: int) -> Int4Weight:
    """weight [N, K] (any float dtype) as an Int4Weight of groups of `group_size` columns."""
    rows, columns = weight.shape
    if group_size < 2 or group_size % 2 or columns % group_size:
        raise ValueError(
            f"group_size {group_size} must be even and divide the weight's {columns} input features"
        )
    groups = weight.detach().float().reshape(rows, columns // group_size, group_size)
    low = groups.amin(dim=-1).clamp(max=0.0)  # the range holds 0, so zero is a code
    high = groups.amax(dim=-1).clamp(min=0.0)
    scale = ((high - low) / LEVELS).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale
    zero = torch.round(-low / scale).clamp(0, LEVELS)
    codes = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, LEVELS).to(torch.uint8)
    codes = codes.reshape(rows, columns)
    packed = (codes[:, 0::2] & NIBBLE) | (codes[:, 1::2] << 4)
    return Int4Weight(packed.contiguous(), scale.contiguous(), (-zero * scale).contiguous(), group_size)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """weight [N, K] (any float dtype) as a per-channel Int8Weight (one group of K columns a row)."""
    columns = weight.shape[1]
    values = weight.detach().float()
    scale = (values.abs().amax(dim=-1, keepdim=True) / INT8_LEVELS).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale
    codes = torch.round(values / scale).clamp(-INT8_LEVELS - 1, INT8_LEVELS).to(torch.int8)
    return Int8Weight(codes.contiguous(), scale.contiguous(), columns)
