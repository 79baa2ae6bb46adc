"""paged_attention (docs/ops.md) on every backend against the float64 oracle: ragged batches of decoding
sequences and prompt chunks over a pool of blocks in shuffled order, GQA, windows, FP8 pools."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import assert_close, random_tensor

from xpu_coopt.ops import fp8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pool(blocks, kv_heads, block_size, head_dim, dtype, kv_dtype, head_major):
    """A pool of random K/V (FP8: codes and bfloat16 scales of random values) and, for the oracle, each
    cell's values in the activation dtype. head_major: stored [Hkv, blocks, ...], seen through strides."""
    values = [random_tensor(blocks, kv_heads, block_size, head_dim, dtype=dtype) for _ in "kv"]
    if head_major:
        values = [v.transpose(0, 1).contiguous().transpose(0, 1) for v in values]
    if kv_dtype == "auto":
        return values, (None, None), values
    scales = [
        (v.float().abs().amax(-1) / fp8.FP8_MAX[kv_dtype]).clamp_min(1e-6).to(fp8.SCALE_DTYPE) for v in values
    ]
    pools = [fp8.encode(v, scale, kv_dtype) for v, scale in zip(values, scales, strict=True)]
    if head_major:
        pools = [p.transpose(0, 1).contiguous().transpose(0, 1) for p in pools]
        scales = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in scales]
    decoded = [fp8.decode(c, s, kv_dtype, dtype) for c, s in zip(pools, scales, strict=True)]
    return pools, scales, decoded


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 32)])
@pytest.mark.parametrize(
    ("counts", "contexts"),
    [([1], [1]), ([1, 1, 1], [5, 17, 40]), ([7, 1, 3], [7, 33, 20]), ([1, 16, 1], [64, 16, 2])],
    ids=["one-token", "decodes", "mixed", "chunk-after-decode"],
)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("head_major", [False, True], ids=["block-major", "head-major"])
def test_paged_attention_matches_the_oracle(
    kernels, dtype, heads, kv_heads, head_dim, counts, contexts, window, kv_dtype, head_major
):
    block_size, blocks = 4, 48
    pools, scales, decoded = _pool(blocks, kv_heads, block_size, head_dim, dtype, kv_dtype, head_major)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(blocks, generator=generator)  # each sequence's blocks scattered through the pool
    width = max(-(-c // block_size) for c in contexts)
    tables = torch.zeros(len(contexts), width, dtype=torch.int32)
    taken = 0
    for s, context in enumerate(contexts):
        used = -(-context // block_size)
        tables[s, :used] = order[taken : taken + used].int()
        taken += used
    query_start = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    query = random_tensor(int(query_start[-1]), heads, head_dim, dtype=dtype)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    kernels.paged_attention(out, query, *pools, *scales, tables, query_start, torch.tensor(contexts, dtype=torch.int32),
                            scale, kv_dtype, *(() if window is None else (window,)))  # fmt: skip
    keys, values = [], []
    for s, context in enumerate(contexts):
        cells = [(int(tables[s, p // block_size]), p % block_size) for p in range(context)]
        keys.append(torch.stack([decoded[0][b, :, c] for b, c in cells]))
        values.append(torch.stack([decoded[1][b, :, c] for b, c in cells]))
    assert_close(
        out, oracles.paged_attention(query, keys, values, query_start, contexts, scale, window), dtype
    )


def test_paged_attention_names_mismatched_tables(kernels):
    pool = torch.zeros(4, 2, 4, 16)
    query = torch.zeros(3, 4, 16)
    args = (torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32))
    with pytest.raises(
        ValueError,
        match=r"paged_attention: block_tables \[S, blocks\], query_start \[S \+ 1\] and context_lens \[S\] must agree",
    ):
        kernels.paged_attention(
            query.clone(),
            query,
            pool,
            pool.clone(),
            None,
            None,
            *args,
            torch.tensor([1], dtype=torch.int32),
            0.25,
            "auto",
        )
    with pytest.raises(TypeError, match=r"paged_attention: context_lens must be torch\.int32"):
        kernels.paged_attention(
            query.clone(), query, pool, pool.clone(), None, None, *args, torch.tensor([1, 3]), 0.25, "auto"
        )
