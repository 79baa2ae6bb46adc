"""QuantizedLinear: a projection whose weight is an Int4Weight or an Int8Weight, as a model built from a
quantized checkpoint (or quantized while loading) holds it; QuantizedEmbedding: an embedding table held
so (a GGUF's token_embd, kept as the file stores it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from xpu_coopt.quant.int4 import Int4Weight
from xpu_coopt.quant.int8 import Int8Weight

QuantizedWeight = Int4Weight | Int8Weight
# weight_dtype="int4" / "int8": a 16-bit weight [N, K] -> its quantized form
Quantize = Callable[[torch.Tensor], QuantizedWeight]


class QuantizedLinear(nn.Module):
    """The weight's tensors held as buffers. xpu_coopt runs it with its backend's 4- or 8-bit GEMM; its
    forward, for code that calls the module, dequantizes the weight each call."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.bits = weight.bits
        self.register_buffer("codes", weight.codes)
        # float32 bits held as int32: model.to(dtype) converts floating-point tensors, and these must stay exact
        self.register_buffer("scale_bits", weight.scales.view(torch.int32))
        offsets = getattr(weight, "offsets", None)
        self.register_buffer("offset_bits", None if offsets is None else offsets.view(torch.int32))
        self.register_buffer("input_order", weight.input_order)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @property
    def quantized_weight(self) -> QuantizedWeight:
        scales = self.scale_bits.view(torch.float32)
        if self.bits == 8:
            return Int8Weight(self.codes, scales, self.group_size)
        offsets = self.offset_bits.view(torch.float32)
        return Int4Weight(self.codes, scales, offsets, self.group_size, self.input_order)

    def release(self) -> None:
        """Drops its tensors, keeping their shapes (meta tensors): where xpu_coopt holds the weight packed
        for its GEMM, the copy here would double the memory."""
        for name, buffer in self.named_buffers(recurse=False):
            setattr(self, name, buffer.to("meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int{self.bits} group_size={self.group_size}"
        )


class QuantizedEmbedding(QuantizedLinear):
    """An embedding table [vocab, hidden] held as a quantized weight, its rows dequantized as tokens look
    them up. Tied to the LM head, the head is a QuantizedLinear of the same tensors."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__(weight)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ids' rows in float32 (the format's values, as transformers' dequantization gives them)."""
        rows = self.quantized_weight.rows(input_ids.reshape(-1)).dequantize(torch.float32)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def tied_head(self) -> QuantizedLinear:
        """The LM head that reads this table: a QuantizedLinear over the same tensors (no copy)."""
        return QuantizedLinear(self.quantized_weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} group_size={self.group_size}"
