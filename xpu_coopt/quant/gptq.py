"""GPTQ and AWQ checkpoints' 4-bit tensors into Int4Weight, exactly.

GPTQ (AutoGPTQ / GPTQModel, quant_method "gptq", bits 4), for a projection of K inputs and N outputs:
    qweight  int32 [K/8, N]    input feature 8i + j of output n in bits 4j..4j+3 of qweight[i, n]
    qzeros   int32 [K/G, N/8]  zero point of output 8c + j in bits 4j of qzeros[g, c]; the "gptq" (v1)
                               format stores zero - 1, "gptq_v2" the zero itself
    scales   float16 [K/G, N]
    g_idx    int32 [K]         each input feature's group (non-monotonic with desc_act / act-order)
    weight[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]
AWQ (AutoAWQ's GEMM format, quant_method "awq", version "gemm"):
    qweight  int32 [K, N/8]    output 8c + AWQ_ORDER[j] in bits 4j of qweight[k, c]
    qzeros   int32 [K/G, N/8]  packed the same way
    scales   float16 [K/G, N]
    weight[n, k] = (q[k, n] - zero[k / G, n]) * scales[k / G, n]
(q - zero) * scale is exact in float32, so the Int4Weight's q * s + (-zero * s) is each format's value.
"""

from __future__ import annotations

import torch

from xpu_coopt.quant.int4 import NIBBLE, Int4Weight

PACKED = 8  # 4-bit values an int32 holds
# The output feature (within a run of 8) that AWQ's packing puts in nibble j.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> uint8 [..., C, 8]: nibble j (bits 4j..4j+3) of each value."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed[..., None] >> shifts) & NIBBLE).to(torch.uint8)


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes -> Int4Weight's packing [N, K/2]."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _groups_as_runs(g_idx: torch.Tensor, group_size: int, name: str) -> torch.Tensor | None:
    """The input order that makes g_idx's groups runs of consecutive columns; None where they are already."""
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, torch.arange(g_idx.numel(), device=g_idx.device) // group_size):
        return None
    counts = torch.bincount(g_idx, minlength=g_idx.numel() // group_size)
    if counts.numel() * group_size != g_idx.numel() or (counts != group_size).any():
        raise ValueError(f"{name}.g_idx does not put {group_size} input features in each group")
    return torch.sort(g_idx, stable=True).indices


def int4_from_gptq(
    tensors: dict[str, torch.Tensor], group_size: int, zero_minus_one: bool, name: str
) -> Int4Weight:
    """A GPTQ projection's qweight, qzeros, scales (and g_idx) as an Int4Weight."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    inputs, outputs = qweight.shape[0] * PACKED, qweight.shape[1]
    if group_size == -1:  # one group over all inputs
        group_size = inputs
    _check_shapes(name, {"qzeros": (qzeros, (inputs // group_size, outputs // PACKED)),
                         "scales": (scales, (inputs // group_size, outputs))})  # fmt: skip
    codes = _nibbles(qweight).permute(1, 0, 2).reshape(outputs, inputs)  # [N, K]
    zeros = _nibbles(qzeros).reshape(inputs // group_size, outputs).t().float() + (
        1.0 if zero_minus_one else 0.0
    )
    g_idx = tensors.get("g_idx")
    order = None if g_idx is None else _groups_as_runs(g_idx, group_size, name)
    if order is not None:
        codes = codes[:, order]
    return _weight(codes, zeros, scales.t(), group_size, order)


def int4_from_awq(tensors: dict[str, torch.Tensor], group_size: int, name: str) -> Int4Weight:
    """An AWQ (GEMM format) projection's qweight, qzeros, scales as an Int4Weight."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    inputs, outputs = qweight.shape[0], qweight.shape[1] * PACKED
    if group_size == -1:
        group_size = inputs
    _check_shapes(name, {"qzeros": (qzeros, (inputs // group_size, outputs // PACKED)),
                         "scales": (scales, (inputs // group_size, outputs))})  # fmt: skip
    unorder = torch.tensor(AWQ_ORDER).argsort()  # nibble holding each output of a run of 8

    def unpacked(packed: torch.Tensor) -> torch.Tensor:  # [rows, N], outputs in their order
        return _nibbles(packed)[..., unorder].reshape(packed.shape[0], outputs)

    return _weight(unpacked(qweight).t(), unpacked(qzeros).t().float(), scales.t(), group_size, None)


def _weight(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
            order: torch.Tensor | None) -> Int4Weight:  # fmt: skip
    """codes uint8 [N, K], zeros and scales [N, K/G] -> Int4Weight (offset -zero * scale, exact)."""
    scales = scales.float().contiguous()
    return Int4Weight(_pack_codes(codes), scales, (-zeros * scales).contiguous(), group_size, order)


def _check_shapes(name: str, expected: dict[str, tuple[torch.Tensor, tuple[int, int]]]) -> None:
    for part, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name}.{part} has shape {tuple(tensor.shape)}, not {shape} as its qweight implies"
            )
