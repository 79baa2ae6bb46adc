"""GGUF's quantized blocks (ggml's format) into xpu_coopt's layouts.

A 2-D GGUF tensor of N rows and K columns is stored row by row, each row as K / 32 blocks:
    Q4_0  18 bytes: d (float16), 16 bytes of codes          weight = (q - 8) * d
    Q4_1  20 bytes: d (float16), m (float16), 16 bytes       weight = q * d + m
A block's byte j holds column j in its low nibble and column j + 16 in its high one.
"""

from __future__ import annotations

import numpy as np
import torch

from xpu_coopt.quant.int4 import Int4Weight

BLOCK = 32  # columns per Q4_0 / Q4_1 / Q8_0 block
# The 4-bit block types read natively: (bytes per block, whether a float16 minimum follows the scale)
INT4_BLOCKS = {"Q4_0": (18, False), "Q4_1": (20, True)}


def int4_from_blocks(raw: np.ndarray, type_name: str, columns: int) -> Int4Weight:
    """A GGUF tensor's raw blocks (uint8 [N, bytes per row]) of a type in INT4_BLOCKS as an Int4Weight
    holding exactly its values."""
    block_bytes, has_min = INT4_BLOCKS[type_name]
    if columns % BLOCK or raw.shape[1] != columns // BLOCK * block_bytes:
        raise ValueError(
            f"a {type_name} tensor of {columns} columns takes {columns // BLOCK * block_bytes} bytes a row "
            f"in blocks of {BLOCK}, this one has {raw.shape[1]}"
        )
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, block_bytes)
    scales = _float16_field(blocks, 0)
    offsets = _float16_field(blocks, 2) if has_min else -8.0 * scales  # exact: a float16 times 8
    quads = blocks[..., 4 if has_min else 2 :]
    codes = np.concatenate((quads & 0x0F, quads >> 4), axis=-1).reshape(raw.shape[0], -1)  # [N, K]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return Int4Weight(
        torch.from_numpy(np.ascontiguousarray(packed)), torch.from_numpy(scales),
        torch.from_numpy(offsets), BLOCK,
    )  # fmt: skip


def _float16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """float32 [N, blocks]: each block's float16 at byte `offset`."""
    return np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16)[..., 0].astype(np.float32)
