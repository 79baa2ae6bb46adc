"""GGUF's 4-bit blocks repacked into Int4Weight, and Q8_0 / Q6_K into Int8Weight, hold exactly the format's
values: against a dequantizer written from ggml's C reference (tests/oracles.py) and against the gguf
package's own."""

from __future__ import annotations

import numpy as np
import oracles
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from helpers import random_blocks, random_int8_blocks, random_q4_k_blocks

from xpu_coopt.quant.gguf_blocks import INT4_BLOCKS, int4_from_blocks, quantized_from_blocks
from xpu_coopt.quant.int4 import Int4Weight


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


@pytest.mark.parametrize(("rows", "columns"), [(1, 256), (3, 768)])
def test_q4_k_blocks_repack_to_the_formats_values_bit_for_bit(rows, columns):
    raw = random_q4_k_blocks(rows, columns)
    weight = int4_from_blocks(raw, "Q4_K", columns).dequantize(torch.float32)
    expected = torch.tensor([oracles.ggml_dequantize_q4_k_row(raw[r].tobytes()) for r in range(rows)])
    assert torch.equal(weight, expected.float())
    theirs = quants.dequantize(raw, GGMLQuantizationType.Q4_K)
    assert torch.equal(weight, torch.from_numpy(np.ascontiguousarray(theirs)))
    with pytest.raises(ValueError, match="a Q4_K tensor of 512 columns takes 288 bytes a row"):
        int4_from_blocks(raw, "Q4_K", 512)


@pytest.mark.parametrize(
    ("type_name", "rows", "columns"), [("Q8_0", 1, 32), ("Q8_0", 5, 576), ("Q6_K", 1, 256), ("Q6_K", 3, 768)]
)
def test_8_bit_blocks_repack_to_the_formats_values_bit_for_bit(type_name, rows, columns):
    raw = random_int8_blocks(rows, columns, type_name)
    weight = quantized_from_blocks(raw, type_name, columns)
    assert weight.bits == 8 and weight.group_size == {"Q8_0": 32, "Q6_K": 16}[type_name]
    oracle = {"Q8_0": oracles.ggml_dequantize_q8_0_row, "Q6_K": oracles.ggml_dequantize_q6_k_row}[type_name]
    expected = torch.tensor([oracle(raw[r].tobytes()) for r in range(rows)])
    assert torch.equal(weight.dequantize(torch.float32), expected.float())
    theirs = quants.dequantize(raw, GGMLQuantizationType[type_name])
    assert torch.equal(weight.dequantize(torch.float32), torch.from_numpy(np.ascontiguousarray(theirs)))
    with pytest.raises(ValueError, match=f"a {type_name} tensor of {2 * columns} columns takes"):
        quantized_from_blocks(raw, type_name, 2 * columns)
