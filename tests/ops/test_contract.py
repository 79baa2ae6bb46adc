"""Every backend accepts exactly what the op contract accepts: the same invalid calls raise the same
exception, with the same message but for the backend's name, on every backend (ops/validate.py)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import KERNEL_BACKENDS

from xpu_coopt.ops.checks import UNBOUNDED_SPAN

BACKEND_NAMES = ("CPU", "SYCL", "Triton")


def _norm(dtype=torch.float32, hidden=8, weight_hidden=None, weight_dtype=None):
    x = torch.randn(3, hidden, dtype=dtype)
    weight = torch.ones(weight_hidden or hidden, dtype=weight_dtype or dtype)
    return x, weight


def _kv_write_args(head_dim=16, kv_dtype="auto", rows_dtype=torch.int64, cache_dtype=None, tokens=2,
                   scale_dtype=torch.bfloat16, v_cache_strided=False):  # fmt: skip
    key = torch.randn(tokens, 2, head_dim)
    storage = cache_dtype or (torch.uint8 if kv_dtype != "auto" else torch.float32)
    cache = torch.zeros(3, 2, 8, head_dim, dtype=storage)
    v_cache = cache.transpose(1, 2).contiguous().transpose(1, 2) if v_cache_strided else cache.clone()
    scale = None if kv_dtype == "auto" else torch.ones(3, 2, 8, dtype=scale_dtype)
    rows = torch.zeros(tokens, dtype=rows_dtype)
    return [key, key.clone(), cache, v_cache, scale, scale, rows, rows.clone(), kv_dtype]


def _strided_heads(x: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] with its heads 2 D apart (every other D of a wider buffer)."""
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], x.shape[2])
    wide[:, ::2] = x
    return wide[:, ::2]


def _prefill_args(queries=4, columns=4, heads=4, kv_heads=2, window=-1):
    query = torch.randn(1, queries, heads, 16)
    key = torch.randn(1, columns, kv_heads, 16)
    return [torch.empty_like(query), query, key, key.clone(), torch.zeros(1, dtype=torch.int32), 0.25, window]


def _decode_args(kv_dtype="auto", slots_dtype=torch.int32, lens=None, table=None, prompt_len=-1, window=-1,
                 strided_query=False, requests=1, response_kv_heads=2):  # fmt: skip
    query = torch.randn(2, 4, 16)
    query = _strided_heads(query) if strided_query else query
    prompt = torch.randn(1, 2, 8, 16)
    response = torch.randn(2, response_kv_heads, 4, 16)
    slots = torch.arange(2, dtype=slots_dtype)[:, None].repeat(1, 4)
    start = torch.zeros(requests, dtype=torch.int32)
    return [torch.empty(2, 4, 16), query, prompt, prompt.clone(), None, None, start, response, response.clone(),
            None, None, slots, 1, 0.25, kv_dtype, lens, table, prompt_len, window]  # fmt: skip


def _strided_columns(x: torch.Tensor) -> torch.Tensor:
    """x's values with a last dimension that is not contiguous."""
    return torch.stack((x, x), dim=-1)[..., 0]


# (op, its arguments, the exception): calls the contract refuses, whatever the backend.
INVALID_CALLS = {
    "norm of float64": ("rms_norm", lambda: [torch.empty(3, 8, dtype=torch.float64), *_norm(torch.float64), 1e-5], TypeError),
    "norm weight of another dtype": ("rms_norm", lambda: [torch.empty(3, 8), *_norm(weight_dtype=torch.float16), 1e-5], TypeError),
    "norm weight of another width": ("rms_norm", lambda: [torch.empty(3, 8), *_norm(weight_hidden=6), 1e-5], ValueError),
    "norm rows not contiguous": ("rms_norm", lambda: [torch.empty(3, 8), _strided_columns(torch.randn(3, 8)), torch.ones(8), 1e-5], ValueError),
    "residual of another shape": ("fused_add_rms_norm", lambda: [torch.randn(3, 8), torch.randn(2, 8), torch.ones(8), 1e-5], ValueError),
    "silu out of the wrong width": ("silu_and_mul", lambda: [torch.empty(3, 5), torch.randn(3, 8)], ValueError),
    "odd head_dim": ("kv_write", lambda: _kv_write_args(head_dim=15), ValueError),
    "int32 cache rows": ("kv_write", lambda: _kv_write_args(rows_dtype=torch.int32), TypeError),
    "unknown kv_dtype": ("kv_write", lambda: _kv_write_args(kv_dtype="int4"), ValueError),
    "FP8 into a float cache": ("kv_write", lambda: _kv_write_args(kv_dtype="fp8_e4m3", cache_dtype=torch.float32), TypeError),
    "static scales of a 16-bit cache": ("kv_write", lambda: [*_kv_write_args(), True], ValueError),
    "a cache of another dtype": ("kv_write", lambda: _kv_write_args(cache_dtype=torch.float16), TypeError),
    "more rows than tokens": ("kv_write", lambda: [*_kv_write_args()[:6], torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), "auto"], ValueError),
    "rotary over a query of another length": ("rotary_embedding_kv_write", lambda: [torch.randn(3, 4, 16), _kv_write_args()[0], _kv_write_args()[1], torch.randn(2, 16), *_kv_write_args()[2:]], ValueError),
    "prefill window 0": ("attention_prefill", lambda: _prefill_args(window=0), ValueError),
    "prefill window past the span": ("attention_prefill", lambda: _prefill_args(window=UNBOUNDED_SPAN), ValueError),
    "more queries than keys": ("attention_prefill", lambda: _prefill_args(queries=5), ValueError),
    "heads not a multiple of KV heads": ("attention_prefill", lambda: _prefill_args(heads=3), ValueError),
    "unknown decode kv_dtype": ("segment_attention_decode", lambda: _decode_args(kv_dtype="fp4"), ValueError),
    "int64 beam slots": ("segment_attention_decode", lambda: _decode_args(slots_dtype=torch.int64), TypeError),
    "int64 segment lengths": ("segment_attention_decode", lambda: _decode_args(lens=torch.tensor([8, 1])), ValueError),
    "int64 block table": ("segment_attention_decode", lambda: _decode_args(table=torch.zeros(1, 1, dtype=torch.int64)), ValueError),
    "prompt_len past the segment": ("segment_attention_decode", lambda: _decode_args(prompt_len=9), ValueError),
    "decode window -2": ("segment_attention_decode", lambda: _decode_args(window=-2), ValueError),
    "decode window past the span": ("segment_attention_decode", lambda: _decode_args(window=UNBOUNDED_SPAN), ValueError),
    "decode query heads not head_dim apart": ("segment_attention_decode", lambda: _decode_args(strided_query=True), ValueError),
    "decode slots of another request count": ("segment_attention_decode", lambda: _decode_args(requests=3), ValueError),
    "decode prompt and response of other KV heads": ("segment_attention_decode", lambda: _decode_args(response_kv_heads=1), ValueError),
    "odd query head_dim for the write": ("rotary_embedding_kv_write", lambda: [torch.randn(2, 4, 15), *_kv_write_args(head_dim=15)[:2], torch.randn(2, 15), *_kv_write_args(head_dim=15)[2:]], ValueError),
    "key heads not head_dim apart": ("kv_write", lambda: [_strided_heads(torch.randn(2, 2, 16)), *_kv_write_args()[1:]], ValueError),
    "scales of another dtype": ("kv_write", lambda: _kv_write_args(kv_dtype="fp8_e4m3", scale_dtype=torch.float32), TypeError),
    "K and V caches of other strides": ("kv_write", lambda: _kv_write_args(v_cache_strided=True), ValueError),
}  # fmt: skip


def _without_backend(message: str) -> str:
    return re.sub("|".join(BACKEND_NAMES), "<backend>", message)


@pytest.mark.parametrize("case", sorted(INVALID_CALLS))
def test_every_backend_refuses_what_the_contract_refuses(case):
    op, arguments, error = INVALID_CALLS[case]
    messages = {}
    for name, kernels in KERNEL_BACKENDS.items():
        with pytest.raises(error) as raised:
            getattr(kernels(), op)(*arguments())
        messages[name] = _without_backend(str(raised.value))
    assert len(set(messages.values())) == 1, messages
    assert messages["reference"].startswith(f"{op}: ")


def test_backend_limits_name_the_backend():
    """Beyond the contract a backend states its limits, and its error names it: the SYCL kernels hold
    head_dim up to 128, the Triton ones up to 256, the CPU ones any even head_dim."""
    args = _kv_write_args(head_dim=256)
    KERNEL_BACKENDS["reference"]().kv_write(*args)
    KERNEL_BACKENDS["triton-interpreter"]().kv_write(*args)
    with pytest.raises(ValueError, match="kv_write: the SYCL kernels support head_dim up to 128, not 256"):
        KERNEL_BACKENDS["sycl-cpu"]().kv_write(*args)
