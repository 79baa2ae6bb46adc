"""The engine's KV pool: per layer, K and V of every block, allocated once.

Stored head-major, [Hkv, blocks, block_size, D] in memory, and handed to the ops as their
[blocks, Hkv, block_size, D] layout through strides: the kernels write and read by strides, and
gathering a sequence's blocks head-major yields each head's keys in order in one copy
(backends/cpu/paged.py).
"""

from __future__ import annotations

import torch

from xpu_coopt.cache.storage import KVFormat, KVStorage, LayerKV
from xpu_coopt.ops import fp8


def allocate_pool(kv: KVFormat, blocks: int, block_size: int) -> KVStorage:
    """A zeroed pool of `blocks` blocks of `block_size` tokens in every layer (dynamic FP8 scales ones)."""
    shape = (kv.num_kv_heads, blocks, block_size, kv.head_dim)
    layers = []
    for _ in range(kv.num_layers):
        k, v = (torch.zeros(shape, dtype=kv.storage_dtype, device=kv.device).transpose(0, 1) for _ in "kv")
        scales = (None, None)
        if fp8.is_fp8(kv.kv_dtype):
            scales = tuple(
                torch.ones(shape[:-1], dtype=fp8.SCALE_DTYPE, device=kv.device).transpose(0, 1) for _ in "kv"
            )
        layers.append(LayerKV(k, v, *scales))
    return KVStorage(layers)
