"""K/V taken out of a cache to be put back in another of the same format: what a PrefixCache keeps
between generate() calls (prefix_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from xpu_coopt.cache.segment import SegmentKVCache


@dataclass
class HeldKV:
    """K/V of a run of tokens as a cache stored them: rotated keys and values [layers, tokens, Hkv, D] in
    the activation dtype or as uint8 FP8 codes, with [layers, tokens, Hkv] bfloat16 scales where each row
    had its own (dynamic FP8; None for 16-bit caches and static scales)."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    def _fields(self) -> list[torch.Tensor | None]:
        return [getattr(self, field.name) for field in fields(self)]

    def tensors(self) -> list[torch.Tensor]:
        return [tensor for tensor in self._fields() if tensor is not None]

    def first(self, count: int) -> HeldKV:
        """The first `count` tokens' K/V (views)."""
        return HeldKV(*(None if tensor is None else tensor[:, :count] for tensor in self._fields()))

    def layer(self, layer: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, ...]]:
        """One layer's (keys, values) [tokens, Hkv, D] and (key scales, value scales)."""
        scales = (
            (None, None) if self.key_scales is None else (self.key_scales[layer], self.value_scales[layer])
        )
        return (self.keys[layer], self.values[layer]), scales


def check_held(
    held: HeldKV, prompt_len: int, storage_dtype: torch.dtype, dynamic_fp8: bool, kv_dtype: str
) -> None:
    """What a cache can continue from: K/V of 1 to prompt_len - 1 tokens, stored as it stores them."""
    keys, values = held.keys, held.values
    if not 0 < keys.shape[1] < prompt_len or values.shape != keys.shape:
        raise ValueError(
            f"continue_from() takes K/V of 1 to {prompt_len - 1} of the prompt's {prompt_len} "
            f"tokens, got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.dtype != storage_dtype or (held.key_scales is not None) != dynamic_fp8:
        raise ValueError(f"continue_from() takes K/V stored as this cache stores them ({kv_dtype})")


@torch.inference_mode()
def request_kv(cache: SegmentKVCache, count: int) -> HeldKV | None:
    """The first `count` K/V the cache's prompt segment holds of request 0 from its prompt's start (with
    one beam, its generated tokens' follow), as stored: the activation dtype, or FP8 codes with their
    dynamic scales (none with static scales, which are the model's). None where the cache no longer
    holds them all: a window on every layer let go of the first, or a ring went over them."""
    if cache.window.passed(cache.prompt_len) > int(cache.prompt_start[0]):
        return None
    cells = cache.request_cells(int(cache.kept_start[0]), count)  # from the prompt's first token's column
    if cells is None:
        return None
    rows, columns = cells
    layers = cache.prompt.storage.layers
    # cache[rows, :, columns]: [count, Hkv(, D)], the indexed dimension first
    held = [torch.stack([layer.k[rows, :, columns] for layer in layers]),
            torch.stack([layer.v[rows, :, columns] for layer in layers])]  # fmt: skip
    if cache.dynamic_fp8():
        held += [torch.stack([layer.k_scale[rows, :, columns] for layer in layers]),
                 torch.stack([layer.v_scale[rows, :, columns] for layer in layers])]  # fmt: skip
    return HeldKV(*held)
