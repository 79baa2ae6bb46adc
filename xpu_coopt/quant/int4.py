"""Int4Weight: 4-bit weights in one layout, whatever format they came from (docs/ops.md, "linear_int4").

    codes    uint8 [N, K/2]   two 4-bit codes a byte: column 2i in the low nibble, 2i + 1 in the high one
    scales   float32 [N, K/G] one per group of G consecutive columns of a row
    offsets  float32 [N, K/G]
    weight[n, k] = codes[n, k] * scales[n, k / G] + offsets[n, k / G], computed in float32
    input_order  int64 [K] or None: column j holds input feature input_order[j] (GPTQ's act-order, whose
                 groups are not runs of consecutive features, sorted into runs); the GEMM then reads
                 x[..., input_order]

Every format's dequantization is this expression exactly: GGUF Q4_1 is q * d + m as written; Q4_0's
(q - 8) * d and GPTQ's (q - z) * s are exact in float32 (a 4-bit integer times a 16-bit scale), so
q * s - 8 s (or - z s) rounds to the same value. float32 scales and offsets hold every format's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NIBBLE = 0x0F


@dataclass(frozen=True)
class Int4Weight:
    codes: torch.Tensor  # uint8 [N, K/2]
    scales: torch.Tensor  # float32 [N, K/G]
    offsets: torch.Tensor  # float32 [N, K/G]
    group_size: int
    input_order: torch.Tensor | None = None  # int64 [K]
    bits = 4

    def __post_init__(self) -> None:
        rows, half = self.codes.shape
        groups = (rows, 2 * half // self.group_size)
        if self.codes.dtype != torch.uint8 or (2 * half) % self.group_size:
            raise ValueError(
                f"4-bit codes must be uint8 [N, K/2] with K a multiple of the group size {self.group_size}, "
                f"got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        for name in ("scales", "offsets"):
            tensor = getattr(self, name)
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != groups:
                raise ValueError(f"{name} must be float32 {groups}, got {tensor.dtype} {tuple(tensor.shape)}")
        order = self.input_order
        if order is not None and (order.dtype != torch.int64 or tuple(order.shape) != (2 * half,)):
            raise ValueError(
                f"input_order must be int64 [{2 * half}], got {order.dtype} {tuple(order.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """[N, K]: output features, input features."""
        return self.codes.shape[0], 2 * self.codes.shape[1]

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 [N, K]: each column's code."""
        return unpack_codes(self.codes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights [N, K] (input features in their own order) as the format defines them, in float32,
        then cast to dtype."""
        codes = self.unpacked_codes().view(self.shape[0], -1, self.group_size).float()
        weight = (codes * self.scales[..., None] + self.offsets[..., None]).reshape(self.shape)
        if self.input_order is not None:
            weight = torch.empty_like(weight).index_copy_(1, self.input_order, weight)
        return weight.to(dtype)

    def rows(self, index: torch.Tensor) -> Int4Weight:
        """The weight of rows `index` (the output features reordered or selected)."""
        return Int4Weight(
            self.codes[index], self.scales[index], self.offsets[index], self.group_size, self.input_order
        )

    def columns(self, start: int, stop: int) -> Int4Weight:
        """The weight of input features [start, stop), whole groups (a row-parallel rank's part)."""
        if self.input_order is not None:
            raise ValueError("a 4-bit weight with an act-order input permutation (GPTQ desc_act) cannot be split by "
                             "input features")  # fmt: skip
        groups = whole_groups(start, stop, self.group_size)
        return Int4Weight(self.codes[:, start // 2 : stop // 2], self.scales[:, groups], self.offsets[:, groups],
                          self.group_size)  # fmt: skip

    def clone(self) -> Int4Weight:
        """A copy holding tensors of its own (a slice's views would keep the whole weight alive)."""
        return Int4Weight(
            self.codes.clone(),
            self.scales.clone(),
            self.offsets.clone(),
            self.group_size,
            None if self.input_order is None else self.input_order.clone(),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors it holds (as PackedWeight.tensors: what the model's weight_bytes counts)."""
        held = (self.codes, self.scales, self.offsets)
        return held if self.input_order is None else (*held, self.input_order)

    def contiguous(self) -> Int4Weight:
        return Int4Weight(
            self.codes.contiguous(), self.scales.contiguous(), self.offsets.contiguous(), self.group_size,
            self.input_order,
        )  # fmt: skip

    @staticmethod
    def concat(parts: list[Int4Weight]) -> Int4Weight:
        """The weights stacked along N (q/k/v or gate/up fused into one GEMM); they share K, the group size
        and the input order."""
        first = parts[0]
        if any(
            (p.shape[1], p.group_size) != (first.shape[1], first.group_size) or not _same_order(p, first)
            for p in parts
        ):
            raise ValueError(
                "4-bit weights fused into one GEMM must share K, the group size and the input order"
            )
        return Int4Weight(
            torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
            torch.cat([p.offsets for p in parts]), first.group_size, first.input_order,
        )  # fmt: skip


def whole_groups(start: int, stop: int, group_size: int) -> slice:
    """The groups that input features [start, stop) make up; ValueError unless they are whole groups."""
    if start % group_size or stop % group_size:
        raise ValueError(
            f"input features [{start}, {stop}) do not split into whole groups of {group_size}: the model "
            "cannot be split there"
        )
    return slice(start // group_size, stop // group_size)


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit codes uint8 [rows, K/2] -> uint8 [rows, K], a code a column."""
    low, high = codes & NIBBLE, codes >> 4
    return torch.stack((low, high), dim=-1).reshape(codes.shape[0], -1)


def _same_order(a: Int4Weight, b: Int4Weight) -> bool:
    if a.input_order is None or b.input_order is None:
        return a.input_order is b.input_order
    return torch.equal(a.input_order, b.input_order)
