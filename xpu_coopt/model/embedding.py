"""The decoder's token embeddings: the model's 16-bit table, or a quantized one (a GGUF's Q8_0
token_embd kept as stored) whose looked-up rows are dequantized to the compute dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xpu_coopt.quant.quantized_linear import QuantizedEmbedding, QuantizedWeight


class QuantizedTable:
    """A quantized embedding table: each step dequantizes only its tokens' rows, exactly as the format
    defines them (float32), then rounds them to the compute dtype, as a dequantized 16-bit copy would."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        self.weight = weight
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.weight.codes.device

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(input_ids).dequantize(self.dtype)  # float32 values, rounded once

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weight.tensors()


EmbeddingTable = torch.Tensor | QuantizedTable


def embedding_table(module: nn.Module, dtype: torch.dtype) -> EmbeddingTable:
    """The table the decoder reads: a QuantizedEmbedding's weight as it is held, else the module's weight
    [vocab, hidden] in dtype."""
    if isinstance(module, QuantizedEmbedding):
        return QuantizedTable(module.quantized_weight, dtype)
    return module.weight.detach().to(dtype)


def embed(table: EmbeddingTable, input_ids: torch.Tensor) -> torch.Tensor:
    """[T, hidden] rows of the ids [T]."""
    if isinstance(table, QuantizedTable):
        return table.lookup(input_ids)
    return F.embedding(input_ids, table)


def table_tensors(table: EmbeddingTable) -> tuple[torch.Tensor, ...]:
    """The tensors a table holds (what the model's weight_bytes counts)."""
    return table.tensors() if isinstance(table, QuantizedTable) else (table,)
