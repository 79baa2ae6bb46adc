"""Every op of docs/ops.md against the loop-based oracles, for every kernel backend, plus opcheck."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import NAN_CODE, assert_close, dequantized, nan_cache, random_tensor, segment_case

from xpu_coopt.backends.cpu import cpu_kernels, native
from xpu_coopt.backends.cpu import decode as cpu_decode
from xpu_coopt.backends.cpu import gemm as cpu_gemm
from xpu_coopt.backends.cpu import kernels as cpu_elementwise
from xpu_coopt.backends.cpu import prefill as cpu_prefill
from xpu_coopt.model.rope import cos_sin_cache, inverse_frequencies
from xpu_coopt.model.spec import RopeSpec
from xpu_coopt.ops import decode_split, dispatcher_kernels, fp8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN_SIZES = [8, 64, 111, 576]
NUM_TOKENS = [1, 7, 33]


# Activations' scales: 1, and small enough that epsilon is most of the mean square (an epsilon added in the
# wrong place then moves the output by far more than the tolerance; at scale 1 it moves it by ~1e-5).
NORM_SCALES = [1.0, 1e-3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("tokens", NUM_TOKENS)
@pytest.mark.parametrize("scale", NORM_SCALES)
def test_rms_norm(kernels, dtype, hidden, tokens, scale):
    x, weight = random_tensor(tokens, hidden, dtype=dtype, scale=scale), random_tensor(hidden, dtype=dtype)
    out = torch.empty_like(x)
    kernels.rms_norm(out, x, weight, 1e-5)
    assert_close(out, oracles.rms_norm(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("scale", NORM_SCALES)
def test_fused_add_rms_norm(kernels, dtype, hidden, scale):
    x, residual, weight = (
        random_tensor(5, hidden, dtype=dtype, scale=scale),
        random_tensor(5, hidden, dtype=dtype, scale=scale),
        random_tensor(hidden, dtype=dtype),
    )
    expected_residual = (x.double() + residual.double()).to(dtype)
    expected = oracles.rms_norm(expected_residual, weight, 1e-6)
    kernels.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert_close(residual, expected_residual, dtype, scale)
    assert_close(x, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 128, 222, 1536])
def test_silu_and_mul(kernels, dtype, width):
    x = random_tensor(3, 4, 2 * width, dtype=dtype)
    out = x.new_empty(3, 4, width)
    kernels.silu_and_mul(out, x)
    assert_close(out, oracles.silu_and_mul(x), dtype)


def _snapshot(caches):
    """The bytes of every (cache, scale) pair, NaN included: to prove an op left its inputs as they were."""
    return [t.contiguous().view(torch.uint8).clone() for pair in caches for t in pair if t is not None]


FP8_TOLERANCE = {"fp8_e4m3": 2**-3, "fp8_e5m2": 2**-2}  # relative step of each format, times amax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 128), (6, 1, 16)])
@pytest.mark.parametrize("fused_qkv", [True, False])
@pytest.mark.parametrize("tokens", [5, 1])
def test_rotary_embedding_kv_write(kernels, dtype, kv_dtype, heads, kv_heads, head_dim, fused_qkv, tokens):
    rows, length = 3, 9
    rope = RopeSpec(theta=10000.0)
    table = cos_sin_cache(rope, head_dim, 64, torch.device("cpu"))
    positions = torch.tensor([0, 3, 17, 63, 5])[:tokens]
    qkv = random_tensor(
        tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype
    )  # strided views, as the model passes
    query = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    if not fused_qkv:  # separate tensors
        query, key, value = query.clone(), key.clone(), value.clone()
    original_q, original_k, original_v = query.clone(), key.clone(), value.clone()
    k_cache, k_scale = nan_cache((rows, kv_heads, length, head_dim), kv_dtype, dtype)
    v_cache, v_scale = nan_cache((rows, kv_heads, length, head_dim), kv_dtype, dtype)
    cache_rows, cache_positions = (
        torch.tensor([0, 2, 1, 2, 0])[:tokens],
        torch.tensor([0, 8, 4, 3, 7])[:tokens],
    )

    kernels.rotary_embedding_kv_write(
        query, key, value, table[positions].to(dtype), k_cache, v_cache, k_scale, v_scale,
        cache_rows, cache_positions, kv_dtype,
    )  # fmt: skip

    inv_freq = inverse_frequencies(rope, head_dim)
    expected_q = oracles.rotate(original_q, positions, inv_freq)
    expected_k = oracles.rotate(original_k, positions, inv_freq)
    assert_close(query, expected_q, dtype, scale=4)
    assert_close(key, expected_k, dtype, scale=4)
    written = torch.zeros((rows, length), dtype=torch.bool)
    written[cache_rows, cache_positions] = True
    for cache, cache_scale, expected in (
        (k_cache, k_scale, expected_k),
        (v_cache, v_scale, original_v.double()),
    ):
        stored = dequantized(cache, cache_scale, kv_dtype)[cache_rows, :, cache_positions]
        if fp8.is_fp8(kv_dtype):
            amax = expected.abs().amax(dim=-1, keepdim=True)
            assert ((stored - expected).abs() <= amax * FP8_TOLERANCE[kv_dtype] + 1e-2).all()
        else:
            assert_close(stored, expected, dtype, scale=4)
        untouched = cache.permute(0, 2, 1, 3)[~written]
        assert (untouched == NAN_CODE).all() if fp8.is_fp8(kv_dtype) else untouched.isnan().all()


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_reference_rotary_rotates_views_of_one_fused_row_at_once(tokens, kv_heads):
    """The CPU kernel rotates q and k in one pass when they are views of one q/k/v row, decode's single
    token included (whose views torch gives unequal, meaningless token strides); separate tensors apart."""
    heads, head_dim = 9, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16)
    query = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    assert cpu_elementwise._key_follows_query(query, key)
    assert not cpu_elementwise._key_follows_query(query, value)  # not adjacent
    assert not cpu_elementwise._key_follows_query(query.clone(), key.clone())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_rows_of_angle_zero_leave_query_and_key_exact(kernels, dtype):
    """A layer without rope (SmolLM3's) passes cos 1 and sin 0: q and k bit for bit as they came in."""
    tokens, heads, kv_heads, head_dim = 5, 4, 2, 64
    query, key, value = (random_tensor(tokens, n, head_dim, dtype=dtype) for n in (heads, kv_heads, kv_heads))
    original_q, original_k = query.clone(), key.clone()
    unrotated = torch.cat((torch.ones(tokens, head_dim // 2), torch.zeros(tokens, head_dim // 2)), -1)
    k_cache, _ = nan_cache((1, kv_heads, tokens, head_dim), "auto", dtype)
    v_cache, _ = nan_cache((1, kv_heads, tokens, head_dim), "auto", dtype)
    kernels.rotary_embedding_kv_write(
        query, key, value, unrotated.to(dtype), k_cache, v_cache, None, None,
        torch.zeros(tokens, dtype=torch.long), torch.arange(tokens), "auto",
    )  # fmt: skip
    assert torch.equal(query, original_q) and torch.equal(key, original_k)
    assert torch.equal(k_cache[0].transpose(0, 1), original_k)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_kv_write_fp8_scales_and_saturation(kernels, kv_dtype):
    key = torch.tensor([[[1e6, -2.0, 0.5, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])  # one huge value; one all-zero row
    value = torch.tensor([[[3.0, -3.0, 1.0, 2.0]], [[-1e30, 1.0, 0.0, 4.0]]])
    k_cache, k_scale = nan_cache((2, 1, 3, 4), kv_dtype, torch.float32)
    v_cache, v_scale = nan_cache((2, 1, 3, 4), kv_dtype, torch.float32)
    rows, cols = torch.tensor([1, 0]), torch.tensor([2, 0])
    kernels.kv_write(key, value, k_cache, v_cache, k_scale, v_scale, rows, cols, kv_dtype)
    limit = fp8.FP8_MAX[kv_dtype]
    # amax / FP8_MAX rounded up to a bfloat16 value: stored exactly, and never below amax / FP8_MAX.
    for scale, amax in ((k_scale[1, 0, 2], 1e6), (v_scale[1, 0, 2], 3.0)):
        assert scale.dtype == torch.bfloat16
        assert float(scale) == float(fp8.round_up_to_bfloat16(torch.tensor(amax / limit)))
        assert amax / limit <= float(scale) < amax / limit * (1 + 2**-7)
    decoded_k = fp8.decode(k_cache, k_scale, kv_dtype, torch.float32)
    decoded_v = fp8.decode(v_cache, v_scale, kv_dtype, torch.float32)
    assert decoded_k[1, 0, 2, 0] == pytest.approx(1e6, rel=2**-4)  # the largest element: within half a step
    assert (decoded_k[0, 0, 0] == 0).all()  # an all-zero row decodes to zeros, not NaN
    assert decoded_v[0, 0, 0, 0] == pytest.approx(-1e30, rel=2**-4)
    assert (
        torch.isfinite(decoded_k[[1, 0], 0, [2, 0]]).all()
        and torch.isfinite(decoded_v[[1, 0], 0, [2, 0]]).all()
    )


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_scales_are_read_by_the_write_and_the_decode(kernels, kv_dtype, dtype):
    # Per-tensor scales broadcast with zero strides: kv_write encodes with them (saturating what exceeds
    # the range, here the rows scaled up 4x) and leaves them alone; decode attention reads them back.
    tokens, kv_heads, head_dim, heads = 8, 2, 64, 4
    key, value = (
        random_tensor(tokens, kv_heads, head_dim, dtype=dtype),
        random_tensor(tokens, kv_heads, head_dim, dtype=dtype),
    )
    key[::3] *= 4
    amax = torch.tensor([key.float().abs().amax() / 2, value.float().abs().amax()])
    base = (amax / fp8.FP8_MAX[kv_dtype]).to(fp8.SCALE_DTYPE)
    k_scale, v_scale = (base[i : i + 1].expand(1, kv_heads, tokens) for i in (0, 1))
    k_cache, _ = nan_cache((1, kv_heads, tokens, head_dim), kv_dtype, dtype)
    v_cache, _ = nan_cache((1, kv_heads, tokens, head_dim), kv_dtype, dtype)
    positions = torch.arange(tokens)
    kernels.kv_write(key, value, k_cache, v_cache, k_scale, v_scale, positions * 0, positions, kv_dtype, True)
    assert torch.equal(base, torch.stack([k_scale[0, 0, 0], v_scale[0, 0, 0]]))
    for cache, source, scale in ((k_cache, key, base[0]), (v_cache, value, base[1])):
        expected = fp8.encode(source, scale.expand(tokens, kv_heads), kv_dtype)
        assert torch.equal(cache[0].permute(1, 0, 2), expected)
    saturated = fp8.decode(k_cache, k_scale, kv_dtype, torch.float32).abs().amax()
    assert saturated == pytest.approx(
        float(base[0]) * fp8.FP8_MAX[kv_dtype], rel=1e-6
    )  # finite, at the limit

    query = random_tensor(1, heads, head_dim, dtype=dtype)
    out = torch.full_like(query, float("nan"))
    empty, empty_scale = k_cache[:, :, :0], k_scale[:, :, :0]
    start, slots = torch.zeros(1, dtype=torch.int32), torch.zeros((1, 0), dtype=torch.int32)
    kernels.segment_attention_decode(out, query, k_cache, v_cache, k_scale, v_scale, start, empty, empty,
                                     empty_scale, empty_scale, slots, 0, head_dim**-0.5, kv_dtype)  # fmt: skip
    stored_k, stored_v = (dequantized(c, sc, kv_dtype) for c, sc in ((k_cache, k_scale), (v_cache, v_scale)))
    expected = oracles.segment_attention_decode(query, stored_k, stored_v, start, stored_k[:, :, :0],
                                                stored_v[:, :, :0], slots, 0, head_dim**-0.5)  # fmt: skip
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kv_write_fp8_codes_are_bit_exact_for_every_16_bit_input(kernels, kv_dtype, dtype):
    # Rows of 127 inputs and FP8_MAX: each row's dynamic scale is exactly 1, so every code must be
    # torch's own cast of its input. 8 KV heads of 128 per token keep the token count small.
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    limit = fp8.FP8_MAX[kv_dtype]
    x = every[torch.isfinite(every) & (every.float().abs() <= limit)]
    per_token = 8 * 127
    tokens = -(-x.numel() // per_token)
    inputs = torch.cat((x, x.new_zeros(tokens * per_token - x.numel()))).view(tokens, 8, 127)
    rows = torch.cat((inputs, torch.full((tokens, 8, 1), limit, dtype=dtype)), dim=-1)  # [T, 8, D=128]
    cache, scale = nan_cache((1, 8, tokens, 128), kv_dtype, dtype)
    positions = torch.arange(tokens)
    kernels.kv_write(
        rows, rows, cache, cache.clone(), scale, scale.clone(), positions * 0, positions, kv_dtype
    )
    assert (scale == 1).all()
    expected = inputs.float().to(fp8.FP8_DTYPES[kv_dtype]).view(torch.uint8)
    codes = cache[0].permute(1, 0, 2)[..., :127]  # [T, 8, 127]
    mismatches = (codes != expected).sum().item()
    assert mismatches == 0, f"{mismatches} of {x.numel()} codes differ from torch's cast"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 128), (3, 1, 32), (8, 1, 64), (6, 2, 8)]
)
# Lengths that are not multiples of any tile (8 query rows, 16 keys), with and without left padding.
@pytest.mark.parametrize(("length", "seq_start"), [(1, [0]), (13, [0, 5, 12]), (32, [0, 31]), (45, [7, 0])])
def test_attention_prefill(kernels, dtype, heads, kv_heads, head_dim, length, seq_start):
    _check_attention_prefill(kernels, dtype, heads, kv_heads, head_dim, length, seq_start)


def _check_attention_prefill(
    kernels, dtype, heads, kv_heads, head_dim, length, seq_start, window=None, queries=None
):
    """attention_prefill over random q/k/v against the oracle; window None: the op's default (none);
    queries: that many queries, the last of the `length` key columns (None: one at every column)."""
    batch = len(seq_start)
    q = random_tensor(batch, length if queries is None else queries, heads, head_dim, dtype=dtype)
    k = random_tensor(batch, length, kv_heads, head_dim, dtype=dtype)
    v = random_tensor(batch, length, kv_heads, head_dim, dtype=dtype)
    starts = torch.tensor(seq_start, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    kernels.attention_prefill(out, q, k, v, starts, scale, *(() if window is None else (window,)))
    assert_close(out, oracles.attention_prefill(q, k, v, starts, scale, window), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 32)])
@pytest.mark.parametrize(("length", "seq_start"), [(13, [0, 5, 12]), (45, [7, 0])])
# one key (the query's own); windows shorter than a query tile, as long as a key tile, and over several
@pytest.mark.parametrize("window", [1, 5, 16, 20])
def test_attention_prefill_sliding_window(
    kernels, dtype, heads, kv_heads, head_dim, length, seq_start, window
):
    """Sliding-window attention (Mistral, Qwen2's sliding layers): query i attends to keys i - window + 1
    to i, those before its row's padding end excluded."""
    _check_attention_prefill(kernels, dtype, heads, kv_heads, head_dim, length, seq_start, window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (6, 1, 128)])
# Fewer queries than key columns (a prompt continued over K/V from an earlier forward): one query, more
# than a query tile, key columns past a key tile; padding that ends before, at and among the queries.
@pytest.mark.parametrize(
    ("length", "queries", "seq_start"), [(13, 1, [0, 5, 12]), (45, 20, [7, 0, 30]), (33, 17, [16])]
)
@pytest.mark.parametrize("window", [None, 5])
def test_attention_prefill_continues_earlier_columns(
    kernels, dtype, heads, kv_heads, head_dim, length, queries, seq_start, window
):
    """Queries at the last columns of the keys attend causally from their own columns (query i is column
    length - queries + i): the keys before them come from the prompt's earlier forward."""
    _check_attention_prefill(kernels, dtype, heads, kv_heads, head_dim, length, seq_start, window, queries)


@pytest.mark.parametrize(
    ("query_shape", "key_shape", "starts", "message"),
    [
        ((1, 5, 2, 16), (1, 4, 2, 16), 1, "5 queries but only 4 key columns"),
        ((1, 4, 3, 16), (1, 4, 2, 16), 1, "3 query heads are not a multiple of 2 KV heads"),
        ((2, 4, 2, 16), (1, 4, 2, 16), 2, "key and value must be \\[2, columns, kv_heads, 16\\]"),
        ((1, 4, 2, 16), (1, 4, 2, 8), 1, "key and value must be \\[1, columns, kv_heads, 16\\]"),
        ((1, 4, 2, 16), (1, 4, 2, 16), 2, "seq_start must hold 1 starts"),
    ],
)
def test_attention_prefill_names_mismatched_shapes(kernels, query_shape, key_shape, starts, message):
    q, k = random_tensor(*query_shape, dtype=torch.float32), random_tensor(*key_shape, dtype=torch.float32)
    with pytest.raises(ValueError, match="attention_prefill: " + message):
        kernels.attention_prefill(
            torch.empty_like(q), q, k, k.clone(), torch.zeros(starts, dtype=torch.int32), 0.25
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block", "queries"), [(1, None), (4, None), (16, None), (4, 21)])
@pytest.mark.parametrize("window", [1, 5, 20, None])
def test_reference_prefill_attends_in_query_blocks(monkeypatch, dtype, block, window, queries):
    """The CPU kernel's masked path runs blocks of PREFILL_QUERY_BLOCK queries, each over the keys from its
    first row's window to its last row: blocks of one query, blocks shorter and longer than the window, a
    last block cut short (45 rows, or 21 at the last columns), rows whose padding ends inside a block, no
    window (causal)."""
    monkeypatch.setattr(cpu_prefill, "PREFILL_QUERY_BLOCK", block)
    _check_attention_prefill(cpu_kernels(), dtype, 8, 2, 32, 45, [7, 0, 30], window, queries)


def test_attention_prefill_sliding_window_without_padding_is_not_causal_attention(kernels):
    """Without padding, the reference kernel's plain causal path (torch's SDPA, no mask) must not serve a
    window shorter than the prompt."""
    q, k, v = (random_tensor(1, 24, 2, 16, dtype=torch.float32) for _ in range(3))
    starts = torch.zeros(1, dtype=torch.int32)
    out = torch.empty_like(q)
    kernels.attention_prefill(out, q, k, v, starts, 0.25, 8)
    assert_close(out, oracles.attention_prefill(q, k, v, starts, 0.25, 8), torch.float32)
    assert not torch.allclose(out, oracles.attention_prefill(q, k, v, starts, 0.25).float(), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize(
    ("requests", "beams", "heads", "kv_heads", "head_dim"),
    [(1, 1, 4, 4, 64), (2, 4, 8, 2, 128), (1, 4, 9, 3, 64), (3, 1, 8, 1, 16), (2, 4, 4, 4, 64)],
)
@pytest.mark.parametrize(
    ("prompt_len", "response_len", "padded"), [(1, 1, False), (37, 6, True), (64, 17, False), (23, 0, True)]
)
def test_segment_attention_decode(
    kernels, dtype, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, padded
):
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        dtype, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, padded
    )
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    before = _snapshot(caches)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    kernels.segment_attention_decode(
        out,
        query,
        pk,
        pv,
        pk_s,
        pv_s,
        prompt_start,
        rk,
        rv,
        rk_s,
        rv_s,
        beam_slots,
        response_len,
        scale,
        kv_dtype,
    )
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                response_len, scale)  # fmt: skip
    assert_close(out, expected, dtype)
    assert all(map(torch.equal, _snapshot(caches), before))  # the caches are read only


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_attention_decode_with_a_prompt_all_padding(kernels, dtype, kv_dtype):
    """A request whose prompt-segment columns are all padding attends to its response steps alone (the CPU
    kernel's prompt partial then has no key: it must weigh nothing when merged with the response's)."""
    prompt_len, response_len = 12, 5
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        dtype, kv_dtype, 2, 2, 4, 2, 32, prompt_len, response_len, True, starts=[3, prompt_len]
    )
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    out = torch.full_like(query, float("nan"))
    kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s,
                                     beam_slots, response_len, 0.2, kv_dtype)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                response_len, 0.2)  # fmt: skip
    assert_close(out, expected, dtype)


def _token_major_view(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """tensor's values ([S, Hkv, C, ...]) in a view of a token-major buffer with one spare KV head first:
    its heads are not adjacent to each other's columns, and it starts past its storage's first element."""
    if tensor is None:
        return None
    seqs, kv_heads, capacity = tensor.shape[:3]
    buffer = torch.zeros((seqs, capacity, kv_heads + 1, *tensor.shape[3:]), dtype=tensor.dtype)
    view = buffer.transpose(1, 2)[:, 1:]
    view.copy_(tensor)
    return view


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize(("requests", "beams", "response_len", "window"), [(2, 4, 6, None), (1, 3, 9, 5)])
def test_segment_attention_decode_reads_strided_response_segments(
    kernels, kv_dtype, requests, beams, response_len, window
):
    """The contract asks only the last dimension to be contiguous: response K/V and scales given as views
    of a token-major buffer are read through their strides."""
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        torch.float32, kv_dtype, requests, beams, 8, 2, 32, 20, response_len, True, window=window
    )
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    rk, rk_s, rv, rv_s = map(_token_major_view, (rk, rk_s, rv, rv_s))
    assert not rk.is_contiguous() and rk.storage_offset() > 0
    out = torch.full_like(query, float("nan"))
    kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s,
                                     beam_slots, response_len, 0.2, kv_dtype, None, None, -1, window or -1)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                response_len, 0.2, window)  # fmt: skip
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize(
    ("requests", "beams", "heads", "kv_heads", "prompt_len", "response_len", "window"),
    # The window's first column: inside the prompt (after request 1's padding, before request 2's); at
    # the first response step; inside the response; the query's own key alone; a one-beam segment (the
    # response in the prompt segment); a long prompt the device kernels split, cut to its last 40 columns
    # (fewer than its splits' shares); longer than the sequence.
    [(3, 2, 8, 2, 37, 6, 40), (2, 4, 4, 4, 37, 6, 6), (2, 4, 8, 2, 37, 6, 4), (1, 3, 4, 2, 20, 5, 1),
     (2, 1, 8, 2, 23, 0, 10), (2, 1, 4, 2, 300, 0, 40), (2, 2, 4, 4, 12, 3, 100)],
    ids=["in-prompt", "at-response", "in-response", "own-key", "one-beam", "long-prompt", "beyond"],
)  # fmt: skip
def test_segment_attention_decode_sliding_window(
    kernels, dtype, kv_dtype, requests, beams, heads, kv_heads, prompt_len, response_len, window
):
    """Each sequence attends to its last `window` columns, prompt columns then response steps; the cells
    before them hold NaN, never read."""
    head_dim = 32
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        dtype, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, True,
        window=window,
    )  # fmt: skip
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    out = torch.full_like(query, float("nan"))
    kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s,
                                     beam_slots, response_len, 0.2, kv_dtype, None, None, -1, window)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                response_len, 0.2, window)  # fmt: skip
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("lengths", ["segment_lens", "paged", "paged-segment_lens"])
def test_segment_attention_decode_sliding_window_with_device_lengths_and_blocks(kernels, lengths):
    """The window counted from lengths read on the device (a replayed CUDA graph's), and over a paged
    prompt segment, whose blocks before the window are never read."""
    requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, window = 2, 2, 4, 2, 32, 70, 4, 30
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        torch.float32, "fp8_e4m3", requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, True,
        keep_spare=True, starts=[0, 50], window=window,
    )  # fmt: skip
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    length_args = [None, None, prompt_len]
    if "paged" in lengths:
        pk, pk_s, length_args[1] = _paged(pk, pk_s, prompt_start, 16, torch.Generator().manual_seed(4))
        pv, pv_s, _ = _paged(pv, pv_s, prompt_start, 16, torch.Generator().manual_seed(4))
    response_capacity = response_len
    if "segment_lens" in lengths:
        length_args[0], length_args[2] = torch.tensor([prompt_len, response_len], dtype=torch.int32), -1
        response_capacity = rk.shape[2]
    out = torch.full_like(query, float("nan"))
    kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s, beam_slots,
                                     response_capacity, 0.2, "fp8_e4m3", *length_args, window)  # fmt: skip
    prompt_k, prompt_v = (t[:, :, :prompt_len] for t in dequantized[:2])
    expected = oracles.segment_attention_decode(query, prompt_k, prompt_v, prompt_start, *dequantized[2:],
                                                beam_slots, response_len, 0.2, window)  # fmt: skip
    assert_close(out, expected, torch.float32)


def _ring(tensor: torch.Tensor | None, cells: int, length: int, dim: int = 2) -> torch.Tensor | None:
    """The first `length` columns (along `dim`) of a segment or of beam_slots as a ring of `cells`: column
    n in cell n % cells, for its last `cells` columns (the earlier ones overwritten)."""
    if tensor is None or length <= cells:
        return tensor
    columns = length - cells + (torch.arange(cells) - (length - cells)) % cells
    return tensor.index_select(dim, columns)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize(
    ("beams", "prompt_cells", "response_len", "response_cells", "window", "device_lengths"),
    # The prompt a ring as long as the window (one beam's: the response in the prompt segment), longer and
    # no multiple of the device kernels' tiles (a tile wraps around it), with beams (their response
    # segment apart); the response a ring too, past the window, as long as it or longer; the lengths
    # passed or read on the device.
    [(1, 30, 0, 0, 30, False), (1, 37, 0, 0, 30, True), (2, 48, 3, 6, 40, False), (3, 40, 3, 6, 40, True),
     (2, 100, 20, 8, 8, False), (3, 16, 25, 12, 10, True)],
)  # fmt: skip
def test_segment_attention_decode_reads_rings_under_a_window(
    kernels, dtype, kv_dtype, beams, prompt_cells, response_len, response_cells, window, device_lengths
):
    """A prompt segment without a block table holds column n in cell n % its columns, a response segment
    step t (and beam_slots its slot) in column t % its columns: under a window no longer than them, a
    decode attends more columns and steps than they hold, as over them laid out in full."""
    requests, heads, kv_heads, head_dim, prompt_len = 2, 4, 2, 32, 100
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        dtype, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, True,
        starts=[0, 75], window=window,
    )  # fmt: skip
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    pk, pk_s, pv, pv_s = (_ring(t, prompt_cells, prompt_len) for t in (pk, pk_s, pv, pv_s))
    rk, rk_s, rv, rv_s = (_ring(t, response_cells, response_len) for t in (rk, rk_s, rv, rv_s))
    slots = _ring(beam_slots, response_cells, response_len, dim=1)
    length_args = [None, None, prompt_len]
    response_capacity = response_len
    if device_lengths:
        length_args[0], length_args[2] = torch.tensor([prompt_len, response_len], dtype=torch.int32), -1
        response_capacity = rk.shape[2]
    out = torch.full_like(query, float("nan"))
    kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s, slots,
                                     response_capacity, 0.2, kv_dtype, *length_args, window)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                response_len, 0.2, window)  # fmt: skip
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("window", [None, 31])
def test_more_columns_than_a_segment_holds_need_a_window_within_it(kernels, window):
    """Without a window, or with one longer than the segment, its columns are not a ring."""
    query, caches, _, prompt_start, beam_slots = segment_case(
        torch.float32, "auto", 1, 1, 4, 4, 16, 30, 0, False
    )
    (pk, _), (pv, _), (rk, _), (rv, _) = caches
    window_args = () if window is None else (window,)
    with pytest.raises(ValueError, match="prompt_len 40 is beyond the 30 columns prompt_k holds"):
        kernels.segment_attention_decode(torch.empty_like(query), query, pk, pv, None, None, prompt_start, rk, rv,
                                         None, None, beam_slots, 0, 0.25, "auto", None, None, 40, *window_args)  # fmt: skip


@pytest.mark.parametrize("window", [0, -2])
def test_a_window_below_one_is_an_error(kernels, window):
    query, caches, _, prompt_start, beam_slots = segment_case(
        torch.float32, "auto", 1, 1, 4, 4, 16, 9, 0, False
    )
    (pk, _), (pv, _), (rk, _), (rv, _) = caches
    message = f"window must be -1 \\(none\\) or from 1 to {2**30 - 1}, not {window}"
    with pytest.raises(ValueError, match="segment_attention_decode: " + message):
        kernels.segment_attention_decode(torch.empty_like(query), query, pk, pv, None, None, prompt_start, rk, rv,
                                         None, None, beam_slots, 0, 0.25, "auto", None, None, -1, window)  # fmt: skip
    q = random_tensor(1, 4, 2, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="attention_prefill: " + message):
        kernels.attention_prefill(
            torch.empty_like(q), q, q, q, torch.zeros(1, dtype=torch.int32), 0.25, window
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_float32", [False, True], ids=["native", "float32"])
def test_reference_decode_attention_with_and_without_float32_matmuls(monkeypatch, dtype, in_float32):
    """The CPU reference runs 16-bit attention matmuls in float32 where oneDNN has no kernels for the dtype
    (cpu_gemm.matmul_dtype; AVX2 CPUs): either way it meets the oracle."""
    monkeypatch.setattr(cpu_gemm, "matmul_dtype", lambda device, d: torch.float32 if in_float32 else d)
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        dtype, "auto", 2, 4, 8, 2, 64, 37, 6, True
    )
    out = torch.full_like(query, float("nan"))
    (pk, _), (pv, _), (rk, _), (rv, _) = caches
    before = _snapshot(caches)
    cpu_kernels().segment_attention_decode(
        out, query, pk, pv, None, None, prompt_start, rk, rv, None, None, beam_slots, 6, 0.125, "auto"
    )
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                6, 0.125)  # fmt: skip
    assert_close(out, expected, dtype)
    assert all(map(torch.equal, _snapshot(caches), before))  # padding is zeroed in a copy, not the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize(
    ("requests", "beams", "heads", "kv_heads", "prompt_len", "response_len", "spare"),
    # the last: a segment far longer than its length, as a decode graph kept for later generations reads
    [(1, 1, 4, 4, 300, 0, 70), (2, 4, 8, 2, 200, 5, 70), (2, 1, 4, 2, 40, 0, 400)],
)
def test_segment_attention_decode_reads_lengths_from_the_device(
    kernels, dtype, kv_dtype, requests, beams, heads, kv_heads, prompt_len, response_len, spare
):
    """segment_lens holds the segments' lengths in a tensor (what a replayed CUDA graph reads); the
    segments are passed at their capacity, with NaN past the lengths. These long prompts are also
    split across several programs by the Triton kernel (flash-decoding), then combined; the split count
    follows the capacity, so with a long spare most splits have nothing to read."""
    head_dim = 64
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        dtype, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, True,
        spare=spare, keep_spare=True,
    )  # fmt: skip
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    assert pk.shape[2] == prompt_len + spare
    lengths = torch.tensor([prompt_len, response_len], dtype=torch.int32)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    capacity = rk.shape[2]
    kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s,
                                     beam_slots, capacity, scale, kv_dtype, lengths)  # fmt: skip
    prompt_k, prompt_v = (t[:, :, :prompt_len] for t in dequantized[:2])
    expected = oracles.segment_attention_decode(query, prompt_k, prompt_v, prompt_start, *dequantized[2:],
                                                beam_slots, response_len, scale)  # fmt: skip
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("response_len", [0, 3])
def test_segment_attention_decode_when_padding_fills_whole_splits(kernels, dtype, kv_dtype, response_len):
    """The device backends split a long prompt across programs (flash-decoding), sharing out each
    request's tiles after its padding: the second request's 40 columns after 260 of padding are fewer
    tiles than it has splits, and with 3 response steps most splits get none, so several splits attend
    to no key at all. Their partials must carry no weight in the combine."""
    requests, beams, heads, kv_heads, head_dim, prompt_len = 2, 2, 4, 2, 64, 300
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        dtype, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, True,
        starts=[0, 260],
    )  # fmt: skip
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s,
                                     beam_slots, response_len, scale, kv_dtype)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                response_len, scale)  # fmt: skip
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize(
    ("beams", "heads", "kv_heads"),
    [(8, 4, 4), (16, 4, 4), (9, 8, 1), (17, 4, 1), (3, 40, 1), (2, 80, 1)],
    ids=["8x1", "16x1", "9x8", "17x4", "3x40", "2x80"],
)
def test_segment_attention_decode_many_beams(kernels, kv_dtype, beams, heads, kv_heads):
    """Wide beam searches: the Triton kernel's response blocks then cover fewer steps for each beam
    (8 and 4 steps of every beam: at most 64 columns), and 21 steps span several blocks. Beams x query
    heads per KV head beyond the rows a SYCL work-group (32) or Triton program (64) serves: several share
    them out, in whole beams (9x8, 17x4) or, for a KV group wider than that (MQA: 3x40, 2x80), in runs of
    rows that span two beams."""
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        torch.float32, kv_dtype, 1, beams, heads, kv_heads, 32, 40, 21, True
    )
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    out = torch.full_like(query, float("nan"))
    kernels.segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s,
                                     beam_slots, 21, 0.2, kv_dtype)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                21, 0.2)  # fmt: skip
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("max_rows", [32, 64])
def test_decode_rows_are_shared_out_in_whole_beams_where_a_group_fits(max_rows):
    """decode_split.chunk_rows for every beams x group up to 40 x 130: each program at most max_rows rows,
    no program without a row, one program where all fit, whole beams in as few programs as that allows
    where a group fits, and `beams` the widest span of beams of any program."""
    for group in range(1, 131):
        for beams in range(1, 41):
            total = beams * group
            chunks = decode_split.chunk_rows(beams, group, max_rows)
            assert (
                chunks.rows <= max_rows
                and (chunks.chunks - 1) * chunks.rows < total <= chunks.rows * chunks.chunks
            )
            if total <= max_rows:
                assert chunks.chunks == 1
            if group <= max_rows:
                assert chunks.rows % group == 0
                assert chunks.chunks == -(-beams // (max_rows // group))
            else:
                assert chunks.chunks == -(-total // max_rows)
            spans = [
                len({row // group for row in range(first, min(first + chunks.rows, total))})
                for first in range(0, total, chunks.rows)
            ]
            assert chunks.beams == max(spans)


def _paged(segment, scale, prompt_start, block_size, generator):
    """A prompt segment [R, Hkv, P, D] (and its scales) as a pool of blocks [N, Hkv, block_size, D] in
    shuffled order and a block table [R, P / block_size + 1] (a spare column: room to grow). The table
    names block 0 for blocks of padding alone and for the spare column; block 0, and every pool cell no
    table entry maps, hold NaN (never read)."""
    requests, heads, length = segment.shape[:3]
    per_request = -(-length // block_size)
    order = (torch.randperm(requests * per_request, generator=generator) + 1).tolist()
    table = torch.zeros((requests, per_request + 1), dtype=torch.int32)
    poison = NAN_CODE if segment.dtype == torch.uint8 else float("nan")
    pool = torch.full(
        (1 + requests * per_request, heads, block_size, *segment.shape[3:]), poison, dtype=segment.dtype
    )
    pool_scale = None if scale is None else torch.full(pool.shape[:3], float("nan"), dtype=scale.dtype)
    for r in range(requests):
        for b in range((int(prompt_start[r]) // block_size), per_request):
            table[r, b] = block = order.pop()
            columns = slice(b * block_size, min((b + 1) * block_size, length))
            width = columns.stop - columns.start
            pool[block, :, :width] = segment[r, :, columns]
            if scale is not None:
                pool_scale[block, :, :width] = scale[r, :, columns]
    return pool, pool_scale, table


@pytest.mark.parametrize(
    ("dtype", "kv_dtype"),
    [(torch.float32, "auto"), (torch.bfloat16, "fp8_e4m3"), (torch.float16, "fp8_e5m2")],
)
# (the lengths' two ways with a block size each, to keep CI's time: each way is independent of the size)
@pytest.mark.parametrize(("block_size", "lengths"), [(16, "prompt_len"), (32, "segment_lens")])
@pytest.mark.parametrize(
    ("requests", "beams", "heads", "kv_heads", "prompt_len", "response_len", "starts"),
    # one request; unequal prompts (padding over whole blocks); beams with a response segment; a long
    # prompt that the device kernels split across programs, most of the second request's being padding;
    # more beams x query heads per KV head (72) than a SYCL work-group or Triton program serves
    [(1, 1, 4, 4, 37, 0, [0]), (3, 1, 8, 2, 70, 0, [0, 40, 69]), (2, 4, 8, 2, 45, 5, [17, 0]),
     (2, 2, 4, 2, 300, 3, [0, 260]), (2, 9, 8, 1, 45, 5, [17, 0])],
)  # fmt: skip
def test_segment_attention_decode_paged_prompt(
    kernels, dtype, kv_dtype, block_size, requests, beams, heads, kv_heads, prompt_len, response_len, starts,
    lengths,
):  # fmt: skip
    """The prompt segment as a pool of blocks and a block table (Opt-Pa) gives the contiguous segment's
    attention. Its length is given by prompt_len, or, as a replayed CUDA graph passes it, in segment_lens
    with prompt_len -1 (the table's whole capacity, a spare block beyond the length)."""
    head_dim = 64
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        dtype, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, True,
        starts=starts,
    )  # fmt: skip
    (pk, pk_s), (pv, pv_s) = caches[:2]
    seed = prompt_len * block_size  # K and V share their block order, as they share a table
    pool_k, pool_k_scale, table = _paged(
        pk, pk_s, prompt_start, block_size, torch.Generator().manual_seed(seed)
    )
    pool_v, pool_v_scale, _ = _paged(pv, pv_s, prompt_start, block_size, torch.Generator().manual_seed(seed))
    (rk, rk_s), (rv, rv_s) = caches[2:]
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    length_args = (None, table, prompt_len)
    if lengths == "segment_lens":
        length_args = (torch.tensor([prompt_len, response_len], dtype=torch.int32), table, -1)
    kernels.segment_attention_decode(out, query, pool_k, pool_v, pool_k_scale, pool_v_scale, prompt_start, rk, rv,
                                     rk_s, rv_s, beam_slots, response_len, scale, kv_dtype, *length_args)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                response_len, scale)  # fmt: skip
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize(("requests_per_chunk", "chunk_rows"), [(1, [2, 2, 2]), (2, [4, 2])])
@pytest.mark.parametrize("attend", ["_attend_requests_rows", "_attend_requests"])
def test_reference_decode_attention_in_request_chunks(
    monkeypatch, paged, kv_dtype, requests_per_chunk, chunk_rows, attend
):
    """The CPU reference attends to a chunk of requests at a time (reference.CPU_CHUNK_BYTES of K/V) where
    it copies K/V: each chunk with its own padding, beams (beam_slots counted from its first row) and
    prompt blocks; with the CPU's rows kernel and with the batched matmuls of other devices."""
    monkeypatch.setattr(cpu_decode, "CPU_ROWS_ATTENTION", attend == "_attend_requests_rows")
    requests, beams, heads, kv_heads, head_dim, prompt_len, response_len = 3, 2, 4, 2, 32, 37, 5
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        torch.bfloat16, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, True,
        starts=[5, 0, 20],
    )  # fmt: skip
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    length_args = ()
    if paged:
        pk, pk_s, table = _paged(pk, pk_s, prompt_start, 16, torch.Generator().manual_seed(3))
        pv, pv_s, _ = _paged(pv, pv_s, prompt_start, 16, torch.Generator().manual_seed(3))
        length_args = (None, table, prompt_len)
    per_request = cpu_decode._request_bytes(query, kv_heads, prompt_len + beams * response_len)
    monkeypatch.setattr(cpu_decode, "CPU_CHUNK_BYTES", requests_per_chunk * per_request)
    chunks = []
    attend_chunk = getattr(cpu_decode, attend)
    monkeypatch.setattr(
        cpu_decode, attend, lambda chunk: chunks.append(chunk.out.shape[0]) or attend_chunk(chunk)
    )
    out = torch.full_like(query, float("nan"))
    cpu_kernels().segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s, rv_s,
                                                 beam_slots, response_len, 0.2, kv_dtype, *length_args)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                response_len, 0.2)  # fmt: skip
    assert_close(out, expected, torch.bfloat16)
    # the query rows of each chunk: all beams of its requests; one chunk where no K/V is copied (the native
    # rows kernel skips the padding where it lies)
    copies = paged or kv_dtype != "auto" or attend == "_attend_requests" or native.library() is None
    assert chunks == (chunk_rows if copies else [sum(chunk_rows)])


def test_paged_prompt_arguments_are_checked(kernels):
    query, caches, _, prompt_start, beam_slots = segment_case(
        torch.float32, "auto", 2, 1, 4, 4, 16, 40, 0, False
    )
    (pk, _), (pv, _), (rk, _), (rv, _) = caches
    pool_k, _, table = _paged(pk, None, prompt_start, 16, torch.Generator().manual_seed(1))
    pool_v, _, _ = _paged(pv, None, prompt_start, 16, torch.Generator().manual_seed(1))

    def call(block_table, prompt_len):
        kernels.segment_attention_decode(torch.empty_like(query), query, pool_k, pool_v, None, None, prompt_start,
                                         rk, rv, None, None, beam_slots, 0, 0.25, "auto", None, block_table,
                                         prompt_len)  # fmt: skip

    table_error = r"prompt_block_table must be an int32 tensor \[requests=2, blocks\]"
    for wrong_table in (table.long(), table[:1]):
        with pytest.raises(ValueError, match=table_error):
            call(wrong_table, 40)
    with pytest.raises(ValueError, match="prompt_len 65 is beyond the 64 columns its blocks hold"):
        call(table, 65)


def test_sycl_paged_blocks_hold_whole_tiles():
    """The SYCL kernel looks a block up once per tile of 16 columns."""
    from conftest import KERNEL_BACKENDS

    query, caches, _, prompt_start, beam_slots = segment_case(
        torch.float32, "auto", 1, 1, 4, 4, 16, 24, 0, False
    )
    (pk, _), (pv, _), (rk, _), (rv, _) = caches
    pool_k, _, table = _paged(pk, None, prompt_start, 8, torch.Generator().manual_seed(1))
    pool_v, _, _ = _paged(pv, None, prompt_start, 8, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="blocks must hold a multiple of 16, not 8"):
        KERNEL_BACKENDS["sycl-cpu"]().segment_attention_decode(
            torch.empty_like(query), query, pool_k, pool_v, None, None, prompt_start, rk, rv, None, None,
            beam_slots, 0, 0.25, "auto", None, table, 24,
        )  # fmt: skip


def test_segment_lens_must_be_two_int32_lengths(kernels):
    query, caches, _, prompt_start, beam_slots = segment_case(
        torch.float32, "auto", 1, 1, 4, 4, 16, 9, 2, False
    )
    (pk, _), (pv, _), (rk, _), (rv, _) = caches
    args = (torch.empty_like(query), query, pk, pv, None, None, prompt_start, rk, rv, None, None, beam_slots, 2,
            0.25, "auto")  # fmt: skip
    with pytest.raises(ValueError, match=r"segment_lens must be an int32 tensor of shape \(2,\)"):
        kernels.segment_attention_decode(*args, torch.tensor([9, 2]))


@pytest.mark.parametrize("backend", ["reference", "sycl-cpu"])
def test_segment_lens_beyond_the_capacity_is_an_error(backend):
    """Backends that read the lengths on the host check them (the Triton kernel reads them on the device)."""
    from conftest import KERNEL_BACKENDS

    query, caches, _, prompt_start, beam_slots = segment_case(
        torch.float32, "auto", 1, 1, 4, 4, 16, 9, 2, False
    )
    (pk, _), (pv, _), (rk, _), (rv, _) = caches
    with pytest.raises(ValueError, match=r"segment_lens \(10, 2\) exceed the segments' capacities \(9, 2\)"):
        KERNEL_BACKENDS[backend]().segment_attention_decode(
            torch.empty_like(query), query, pk, pv, None, None, prompt_start, rk, rv, None, None, beam_slots, 2,
            0.25, "auto", torch.tensor([10, 2], dtype=torch.int32),
        )  # fmt: skip


def _opcheck(op_name, args):
    torch.library.opcheck(getattr(dispatcher_kernels(), op_name).default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_elementwise_ops(dtype):
    x, weight = random_tensor(3, 64, dtype=dtype), random_tensor(64, dtype=dtype)
    _opcheck("rms_norm", (torch.empty_like(x), x, weight, 1e-5))
    _opcheck("fused_add_rms_norm", (x.clone(), x.clone(), weight, 1e-5))
    _opcheck("silu_and_mul", (x.new_empty(3, 32), x))


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
def test_opcheck_cache_and_attention_ops(kv_dtype):
    dtype = torch.bfloat16
    query, caches, _, prompt_start, beam_slots = segment_case(dtype, kv_dtype, 2, 2, 4, 2, 16, 9, 3, True)
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    _opcheck("segment_attention_decode", (torch.empty_like(query), query, pk, pv, pk_s, pv_s, prompt_start,
                                          rk, rv, rk_s, rv_s, beam_slots, 3, 0.25, kv_dtype))  # fmt: skip
    pool_k, pool_k_scale, block_table = _paged(pk, pk_s, prompt_start, 16, torch.Generator().manual_seed(2))
    pool_v, pool_v_scale, _ = _paged(pv, pv_s, prompt_start, 16, torch.Generator().manual_seed(2))
    _opcheck("segment_attention_decode", (torch.empty_like(query), query, pool_k, pool_v, pool_k_scale,
                                          pool_v_scale, prompt_start, rk, rv, rk_s, rv_s, beam_slots, 3, 0.25,
                                          kv_dtype, None, block_table, 9))  # fmt: skip
    table = cos_sin_cache(RopeSpec(theta=10000.0), 16, 32, torch.device("cpu"))
    q, k, v = (
        random_tensor(4, 4, 16, dtype=dtype),
        random_tensor(4, 2, 16, dtype=dtype),
        random_tensor(4, 2, 16, dtype=dtype),
    )
    k_cache, k_scale = nan_cache((2, 2, 8, 16), kv_dtype, dtype)
    v_cache, v_scale = nan_cache((2, 2, 8, 16), kv_dtype, dtype)
    rows, cols = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 3])
    _opcheck("rotary_embedding_kv_write", (q, k, v, table[:4].to(dtype), k_cache, v_cache, k_scale, v_scale,
                                           rows, cols, kv_dtype))  # fmt: skip
    _opcheck("kv_write", (k, v, k_cache, v_cache, k_scale, v_scale, rows, cols, kv_dtype))
    if k_scale is not None:
        _opcheck("kv_write", (k, v, k_cache, v_cache, k_scale, v_scale, rows, cols, kv_dtype, True))
    q4, k4 = random_tensor(2, 5, 4, 16, dtype=dtype), random_tensor(2, 5, 2, 16, dtype=dtype)
    _opcheck("attention_prefill", (torch.empty_like(q4), q4, k4, k4.clone(), torch.tensor([0, 2], dtype=torch.int32),
                                   0.25))  # fmt: skip
    _opcheck("attention_prefill", (torch.empty_like(q4), q4, k4, k4.clone(), torch.tensor([0, 2], dtype=torch.int32),
                                   0.25, 2))  # fmt: skip
    _opcheck("segment_attention_decode", (torch.empty_like(query), query, pk, pv, pk_s, pv_s, prompt_start,
                                          rk, rv, rk_s, rv_s, beam_slots, 3, 0.25, kv_dtype, None, None, -1,
                                          4))  # fmt: skip
