"""K/V storage: one tensor per layer for K and one for V (and their FP8 scales), never one spanning layers.

A tensor spanning layers would make the largest single allocation the whole cache's K: Llama-2-7B in
float16 at batch 4 x 4096 tokens is 4 GiB, which an Intel Arc A-series GPU cannot allocate at once. Per
layer the largest is one layer's K (128 MiB there), and growing a segment copies one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from xpu_coopt.ops import fp8


class LayerKV(NamedTuple):
    """One layer's K and V of a segment (or a pool of blocks), with their FP8 scales (None for a 16-bit
    cache), in the ops' argument order: k, v [rows, Hkv, columns, D] in the activation dtype or as uint8
    FP8 codes; k_scale, v_scale [rows, Hkv, columns] bfloat16 (static scales: one per layer, broadcast
    with zero strides). A tuple, so that a call unpacks it (*kv) without building one."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class KVFormat:
    """How a cache stores K/V: num_layers tensors of num_kv_heads x head_dim rows, in the activation dtype
    (kv_dtype "auto") or as FP8 codes with a bfloat16 scale per (token, KV head), or with static_scales
    ([layers] K and V scales, fp8.SCALE_DTYPE) one per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    dtype: torch.dtype  # the activations'
    device: torch.device
    static_scales: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if fp8.is_fp8(self.kv_dtype) else self.dtype

    def allocate(self, rows: int, columns: int) -> KVStorage:
        """A zeroed segment of `rows` rows of `columns` columns, in every layer."""
        shape = (rows, self.num_kv_heads, columns, self.head_dim)
        return KVStorage([self._layer(shape, layer) for layer in range(self.num_layers)])

    def _layer(self, shape: tuple[int, ...], layer: int) -> LayerKV:
        k, v = (torch.zeros(shape, dtype=self.storage_dtype, device=self.device) for _ in "kv")
        if not fp8.is_fp8(self.kv_dtype):
            return LayerKV(k, v)
        if self.static_scales is None:
            scales = (torch.ones(shape[:-1], dtype=fp8.SCALE_DTYPE, device=self.device) for _ in "kv")
        else:  # the layer's one scale, broadcast: zero strides in every dimension, so growing needs no storage
            scales = (scale[layer].expand(shape[:-1]) for scale in self.static_scales)
        return LayerKV(k, v, *scales)


class KVStorage:
    """A segment's K/V: one LayerKV per layer, all of one shape."""

    def __init__(self, layers: list[LayerKV]) -> None:
        self.layers = layers

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    @property
    def rows(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def columns(self) -> int:
        return self.layers[0].k.shape[2]

    def grow(self, dim: int, extra: int) -> None:
        """`extra` more zeroed rows (dim 0) or columns (dim 2) in every layer, a layer at a time: the
        cells held keep their place."""
        self.layers = [LayerKV(*(extend(tensor, dim, extra) for tensor in layer)) for layer in self.layers]

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer if t is not None]


def extend(tensor: torch.Tensor | None, dim: int, extra: int) -> torch.Tensor | None:
    """`tensor` with `extra` more zero entries along `dim` (a copy); a broadcast view of static scales
    (zero stride there) grows without storage."""
    if tensor is None:
        return None
    if tensor.stride(dim) == 0:
        shape = list(tensor.shape)
        shape[dim] += extra
        return tensor.as_strided(shape, tensor.stride())
    pad_shape = list(tensor.shape)
    pad_shape[dim] = extra
    return torch.cat((tensor, tensor.new_zeros(pad_shape)), dim=dim)


def storage_bytes(tensors: list[torch.Tensor | None]) -> dict[int, int]:
    """Bytes of each storage the tensors use, by address: views of one storage (broadcast static scales
    among them) count once, at their storage's size."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
