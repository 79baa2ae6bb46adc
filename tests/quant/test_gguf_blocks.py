"""GGUF's 4-bit blocks repacked into Int4Weight hold exactly the format's values: against a dequantizer
written from ggml's C reference (tests/oracles.py) and against the gguf package's own."""

from __future__ import annotations

import numpy as np
import oracles
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from xpu_coopt.quant.gguf_blocks import INT4_BLOCKS, int4_from_blocks
from xpu_coopt.quant.int4 import Int4Weight


def random_blocks(rows: int, columns: int, type_name: str, seed: int = 0) -> np.ndarray:
    """Raw blocks [rows, bytes per row]: random codes, float16 scales (and minimums) of either sign and
    a spread of magnitudes, as a quantizer writes them."""
    generator = np.random.default_rng(seed)
    block_bytes, has_min = INT4_BLOCKS[type_name]
    blocks = generator.integers(0, 256, size=(rows, columns // 32, block_bytes), dtype=np.uint8)
    magnitudes = generator.choice([1e-4, 1e-2, 1.0, 40.0], size=(rows, columns // 32, 2))
    fields = (generator.standard_normal((rows, columns // 32, 2)) * magnitudes).astype(np.float16)
    blocks[..., : 4 if has_min else 2] = fields.view(np.uint8)[..., : 4 if has_min else 2]
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(INT4_BLOCKS))
@pytest.mark.parametrize(("rows", "columns"), [(1, 32), (3, 64), (7, 576)])
def test_blocks_repack_to_the_formats_values_bit_for_bit(type_name, rows, columns):
    raw = random_blocks(rows, columns, type_name)
    weight = int4_from_blocks(raw, type_name, columns).dequantize(torch.float32)
    expected = torch.tensor([oracles.ggml_dequantize_row(raw[r].tobytes(), type_name) for r in range(rows)])
    assert torch.equal(weight, expected.float())
    theirs = quants.dequantize(raw, GGMLQuantizationType[type_name])
    assert torch.equal(weight, torch.from_numpy(np.ascontiguousarray(theirs)))


def test_rows_and_concat_keep_the_values():
    first = int4_from_blocks(random_blocks(4, 64, "Q4_1", seed=1), "Q4_1", 64)
    second = int4_from_blocks(random_blocks(2, 64, "Q4_0", seed=2), "Q4_0", 64)
    fused = Int4Weight.concat([first, second])
    assert torch.equal(fused.dequantize(), torch.cat((first.dequantize(), second.dequantize())))
    order = torch.tensor([3, 0, 2, 1])
    assert torch.equal(first.rows(order).dequantize(), first.dequantize()[order])


def test_a_row_of_the_wrong_length_is_an_error():
    raw = random_blocks(2, 64, "Q4_0")
    with pytest.raises(
        ValueError, match=r"a Q4_0 tensor of 96 columns takes 54 bytes a row .* this one has 36"
    ):
        int4_from_blocks(raw, "Q4_0", 96)
