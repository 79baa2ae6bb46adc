"""Int8Weight: 8-bit weights (and GGUF's 6-bit Q6_K) in one layout (docs/ops.md, "linear_int8").

    codes   int8 [N, K]       one signed code a column
    scales  float32 [N, K/G]  one per group of G consecutive columns of a row (G = K: per channel)
    weight[n, k] = codes[n, k] * scales[n, k / G], computed in float32

Every format's dequantization is this expression exactly: GGUF Q8_0 is q * d (d a float16); Q6_K is
(d * scale_s) * (q - 32), d a float16 and scale_s an 8-bit integer, whose product and its product with
a 6-bit code are exact in float32 (at most 24 significant bits); RTN's per-channel q * s as written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xpu_coopt.quant.int4 import whole_groups


@dataclass(frozen=True)
class Int8Weight:
    codes: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N, K/G]
    group_size: int
    input_order = None  # the column order is the input features' own (as an Int4Weight without act-order)
    bits = 8

    def __post_init__(self) -> None:
        rows, columns = self.codes.shape
        if self.codes.dtype != torch.int8 or columns % self.group_size:
            raise ValueError(
                f"8-bit codes must be int8 [N, K] with K a multiple of the group size {self.group_size}, "
                f"got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        groups = (rows, columns // self.group_size)
        if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != groups:
            raise ValueError(
                f"scales must be float32 {groups}, got {self.scales.dtype} {tuple(self.scales.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """[N, K]: output features, input features."""
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights [N, K] as the format defines them, in float32, then cast to dtype."""
        codes = self.codes.view(self.shape[0], -1, self.group_size).float()
        return (codes * self.scales[..., None]).reshape(self.shape).to(dtype)

    def rows(self, index: torch.Tensor) -> Int8Weight:
        """The weight of rows `index` (the output features reordered or selected)."""
        return Int8Weight(self.codes[index], self.scales[index], self.group_size)

    def columns(self, start: int, stop: int) -> Int8Weight:
        """The weight of input features [start, stop): whole groups, or part of a row's one (per channel)."""
        if self.group_size == self.shape[1]:  # one scale a row: it holds for any part of the row
            return Int8Weight(self.codes[:, start:stop], self.scales, stop - start)
        groups = whole_groups(start, stop, self.group_size)
        return Int8Weight(self.codes[:, start:stop], self.scales[:, groups], self.group_size)

    def clone(self) -> Int8Weight:
        """A copy holding tensors of its own (a slice's views would keep the whole weight alive)."""
        return Int8Weight(self.codes.clone(), self.scales.clone(), self.group_size)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors it holds (what the model's weight_bytes counts)."""
        return self.codes, self.scales

    def contiguous(self) -> Int8Weight:
        return Int8Weight(self.codes.contiguous(), self.scales.contiguous(), self.group_size)

    @staticmethod
    def concat(parts: list[Int8Weight]) -> Int8Weight:
        """The weights stacked along N (q/k/v or gate/up fused into one GEMM); they share K and the group size."""
        first = parts[0]
        if any((p.shape[1], p.group_size) != (first.shape[1], first.group_size) for p in parts):
            raise ValueError("8-bit weights fused into one GEMM must share K and the group size")
        return Int8Weight(
            torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), first.group_size
        )
