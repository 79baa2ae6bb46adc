"""GGUF's quantized blocks (ggml's format) into xpu_coopt's layouts.

A 2-D GGUF tensor of N rows and K columns is stored row by row, each row as blocks:
    Q4_0  32 columns, 18 bytes: d (float16), 16 bytes of codes    weight = (q - 8) * d
    Q4_1  32 columns, 20 bytes: d (float16), m (float16), codes   weight = q * d + m
          a block's byte j holds column j in its low nibble and column j + 16 in its high one
    Q4_K  256 columns, 144 bytes: d, dmin (float16), 12 bytes of 6-bit scales and minimums of its 8
          sub-blocks of 32 (ggml's get_scale_min_k4), 128 bytes of codes: each run of 32 bytes holds
          sub-block 2i in its low nibbles and sub-block 2i + 1 in its high ones
          weight = (d * scale_s) * q - dmin * min_s, s the column's sub-block (d * scale_s and
          dmin * min_s are exact in float32: a float16 times a 6-bit integer)
    Q8_0  32 columns, 34 bytes: d (float16), 32 int8 codes                 weight = q * d
    Q6_K  256 columns, 210 bytes: 128 bytes of low nibbles (ql), 64 of high 2-bit pairs (qh), 16 int8
          scales of its sub-blocks of 16, d (float16); each half of 128 columns reads 64 bytes of ql
          and 32 of qh: column l + 32 j (l < 32, j < 4) takes ql[l + 32 (j % 2)]'s low (j < 2) or high
          nibble and qh[l]'s bits 2j, 2j + 1                             weight = (d * scale_s) * (q - 32)
"""

from __future__ import annotations

import numpy as np
import torch

from xpu_coopt.quant.int4 import Int4Weight
from xpu_coopt.quant.int8 import Int8Weight

BLOCK = 32  # columns per Q4_0 / Q4_1 block, and per Q4_K sub-block (the Int4Weight's group)
SUPER_BLOCK = 256  # columns per Q4_K block
Q4_K_BYTES = 144
# The 4-bit block types read natively: (bytes per block, whether a float16 minimum follows the scale)
INT4_BLOCKS = {"Q4_0": (18, False), "Q4_1": (20, True)}
INT4_TYPES = (*INT4_BLOCKS, "Q4_K")
INT8_TYPES = ("Q8_0", "Q6_K")  # held as Int8Weight: Q8_0 in groups of 32, Q6_K of 16
QUANTIZED_TYPES = (*INT4_TYPES, *INT8_TYPES)
Q8_0_BYTES = 34
Q6_K_BYTES = 210
Q6_K_GROUP = 16


def quantized_from_blocks(raw: np.ndarray, type_name: str, columns: int) -> Int4Weight | Int8Weight:
    """A GGUF tensor's raw blocks (uint8 [N, bytes per row]) of a type in QUANTIZED_TYPES as the weight
    layout that holds exactly its values."""
    if type_name == "Q8_0":
        return _int8_from_q8_0(raw, columns)
    if type_name == "Q6_K":
        return _int8_from_q6_k(raw, columns)
    return int4_from_blocks(raw, type_name, columns)


def _check_row_bytes(raw: np.ndarray, type_name: str, columns: int, block: int, block_bytes: int) -> None:
    if columns % block or raw.shape[1] != columns // block * block_bytes:
        raise ValueError(
            f"a {type_name} tensor of {columns} columns takes {columns // block * block_bytes} bytes a row "
            f"in blocks of {block}, this one has {raw.shape[1]}"
        )


def int4_from_blocks(raw: np.ndarray, type_name: str, columns: int) -> Int4Weight:
    """A GGUF tensor's raw blocks (uint8 [N, bytes per row]) of a type in INT4_TYPES as an Int4Weight
    holding exactly its values."""
    if type_name == "Q4_K":
        return _int4_from_q4_k(raw, columns)
    block_bytes, has_min = INT4_BLOCKS[type_name]
    _check_row_bytes(raw, type_name, columns, BLOCK, block_bytes)
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


def _int4_from_q4_k(raw: np.ndarray, columns: int) -> Int4Weight:
    _check_row_bytes(raw, "Q4_K", columns, SUPER_BLOCK, Q4_K_BYTES)
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q4_K_BYTES)
    scales, minimums = _q4_k_scales_and_minimums(blocks[..., 4:16])  # [N, blocks, 8] each
    d, dmin = _float16_field(blocks, 0)[..., None], _float16_field(blocks, 2)[..., None]
    quads = blocks[..., 16:].reshape(rows, -1, 4, 32)  # 4 runs of 32 bytes: sub-blocks 2i (low), 2i + 1
    codes = np.stack((quads & 0x0F, quads >> 4), axis=3).reshape(rows, -1)  # [N, K], columns in order
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return Int4Weight(
        torch.from_numpy(np.ascontiguousarray(packed)),
        torch.from_numpy((d * scales.astype(np.float32)).reshape(rows, -1)),
        torch.from_numpy((-(dmin * minimums.astype(np.float32))).reshape(rows, -1)),
        BLOCK,
    )


def _q4_k_scales_and_minimums(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_K block's 12 scale bytes [..., 12] -> its 8 sub-blocks' 6-bit scales and minimums, as ggml's
    get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (minimums); 4-7 in
    the nibbles of bytes 8-11, their top 2 bits in the top bits of bytes 0-3 (scales) and 4-7 (minimums)."""
    low, high, nibbles = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate((low & 63, (nibbles & 0x0F) | ((low >> 6) << 4)), axis=-1)
    minimums = np.concatenate((high & 63, (nibbles >> 4) | ((high >> 6) << 4)), axis=-1)
    return scales, minimums


def _int8_from_q8_0(raw: np.ndarray, columns: int) -> Int8Weight:
    _check_row_bytes(raw, "Q8_0", columns, BLOCK, Q8_0_BYTES)
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, Q8_0_BYTES)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(raw.shape[0], -1)
    return Int8Weight(torch.from_numpy(codes), torch.from_numpy(_float16_field(blocks, 0)), BLOCK)


def _int8_from_q6_k(raw: np.ndarray, columns: int) -> Int8Weight:
    _check_row_bytes(raw, "Q6_K", columns, SUPER_BLOCK, Q6_K_BYTES)
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q6_K_BYTES)
    low = blocks[..., :128].reshape(rows, -1, 2, 2, 32)  # [.., half, ql run (j % 2), l]
    high = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32)  # [.., half, 1, l]
    nibbles = np.stack((low & 0x0F, low >> 4), axis=3).reshape(rows, -1, 2, 4, 32)  # [.., half, j, l]
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None]  # qh bits 2j, 2j + 1 for column l + 32 j
    pairs = (high >> shifts) & 3
    codes = (nibbles | (pairs << 4)).astype(np.int8) - np.int8(32)
    scales = blocks[..., 192:208].view(np.int8).astype(np.float32)  # [.., 16]
    d = _float16_field(blocks, 208)[..., None]
    return Int8Weight(
        torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, -1))),
        torch.from_numpy(np.ascontiguousarray((d * scales).reshape(rows, -1))),
        Q6_K_GROUP,
    )
