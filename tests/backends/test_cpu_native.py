"""The CPU backend's attention of a few rows (backends/cpu/rows_attention.py): the native kernel and
torch's flash kernel it replaces where none can be built, against float64 softmax attention; and how
the native library is built, cached and done without."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import assert_close

from xpu_coopt.backends.cpu import cpu_kernels, native, rows_attention

PATHS = {
    "native": native.attend_rows,
    "flash": rows_attention._attend_rows_flash,
}

# (batch, heads, rows, columns, head_dim): a SmolLM2 decode layer (3 KV heads, 3 query heads each), beams
# of a GQA model, a head_dim not a multiple of 16, one column, columns past several of the kernel's blocks
SHAPES = [(1, 3, 3, 1056, 64), (2, 2, 8, 37, 128), (3, 1, 5, 300, 72), (1, 2, 1, 1, 16), (2, 4, 4, 700, 80)]


def _expected(query, key, value, scale, first_column):
    """float64 softmax attention over the columns from each batch's first on, and its log-sum-exp."""
    key, value = key.double(), value.double()
    if first_column is not None:  # the padding's K/V (NaN in these cases) zeroed, its scores -inf
        before = (torch.arange(key.shape[2])[None, :] < first_column[:, None])[:, None, :, None]
        key, value = key.masked_fill(before, 0.0), value.masked_fill(before, 0.0)
    scores = query.double() @ key.transpose(-1, -2) * scale
    if first_column is not None:
        scores = scores.masked_fill(before.transpose(-1, -2), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ value
    return out, lse


def _case(shape, dtype, padded: bool):
    """Query, and K/V as views into longer caches with a garbage (NaN) column past the ones attended; the
    first columns of each batch but the first, when padded, set to NaN too (never read)."""
    batch, heads, rows, columns, dim = shape
    query = torch.randn(batch, heads, rows, dim).to(dtype) * 2
    caches = [torch.randn(batch, heads, columns + 9, dim).to(dtype) for _ in range(2)]
    for cache in caches:
        cache[:, :, columns:] = float("nan")
    first_column = None
    if padded:
        first_column = torch.tensor(
            [0] + [(b * columns) // batch for b in range(1, batch)], dtype=torch.int64
        )
        for b, start in enumerate(first_column.tolist()):
            for cache in caches:
                cache[b, :, :start] = float("nan")
    key, value = (cache[:, :, :columns] for cache in caches)
    return query, key, value, first_column


@pytest.fixture(scope="module")
def built():
    if native.library() is None:
        pytest.fail(f"the native CPU kernels could not be built here: {native._unavailable}")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_attention_of_a_few_rows_matches_float64(built, path, dtype, shape, padded):
    query, key, value, first_column = _case(shape, dtype, padded)
    scale = 1 / math.sqrt(shape[-1])
    out, lse = PATHS[path](query, key, value, scale, first_column)
    expected_out, expected_lse = _expected(query, key, value, scale, first_column)
    assert out.dtype == dtype and out.shape == query.shape and lse.dtype == torch.float32
    assert_close(out, expected_out, dtype)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_batch_with_only_padding_gives_zeros_and_minus_infinity(built, path):
    query, key, value, _ = _case((2, 2, 3, 20, 64), torch.bfloat16, False)
    first_column = torch.tensor([20, 5], dtype=torch.int64)
    out, lse = PATHS[path](query, key, value, 0.125, first_column)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == float("-inf")).all())
    expected_out, expected_lse = _expected(query[1:], key[1:], value[1:], 0.125, first_column[1:])
    assert_close(out[1:], expected_out, torch.bfloat16)
    torch.testing.assert_close(lse[1:].double(), expected_lse, atol=1e-5, rtol=1e-5)


def test_the_native_kernel_reads_strided_queries_and_keys(built):
    """Query rows and K/V columns at strides other than head_dim (views of wider tensors)."""
    wide = torch.randn(2, 3, 4, 2 * 64, dtype=torch.bfloat16)
    query = wide[..., :64]
    key, value = (torch.randn(3, 2, 50, 64, dtype=torch.bfloat16).transpose(0, 1) for _ in range(2))
    out, lse = native.attend_rows(query, key, value, 0.125, None)
    expected_out, expected_lse = _expected(query, key, value, 0.125, None)
    assert_close(out, expected_out, torch.bfloat16)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """native's module state as before its first use, with an empty disk cache."""
    monkeypatch.setenv("XPU_COOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_unavailable", None)
    return tmp_path


def test_the_library_is_built_once_and_says_so(fresh_library, capsys):
    assert native.library() is not None
    assert "building xpu_coopt's native CPU kernels (once" in capsys.readouterr().err
    assert [path.name.split("-")[0] for path in fresh_library.iterdir()] == ["cpu_kernels"]
    assert native.library() is not None and capsys.readouterr().err == ""


def test_without_a_compiler_it_warns_once_and_runs_torch_kernels(fresh_library, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_library / "no-such-compiler"))
    with pytest.warns(
        UserWarning, match=r"no-such-compiler is needed to build .*native CPU kernels.*about 1.5x slower"
    ):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
        query, key, value, first_column = _case((2, 3, 3, 40, 64), torch.bfloat16, True)
        out, _ = rows_attention.attend_rows(query, key, value, 0.125, first_column)
    assert_close(out, _expected(query, key, value, 0.125, first_column)[0], torch.bfloat16)


def test_the_variable_turns_it_off_without_a_warning(fresh_library, monkeypatch):
    monkeypatch.setenv(native.NATIVE_VARIABLE, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
    assert list(fresh_library.iterdir()) == []


def _torch_path(monkeypatch):
    """The CPU kernels with the native library set aside: their PyTorch arithmetic."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_unavailable", "compared")


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("hidden", [576, 72, 4099])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_native_layer_ops_round_as_the_torch_kernels_do(built, monkeypatch, dtype, hidden, rows):
    """The native norms and SiLU against the PyTorch kernels they replace, on strided rows (every other
    row of a wider tensor): the same roundings in the activation dtype, so at most one unit in the last
    place apart (a float32 sum of squares in another order), and in 16 bits mostly equal."""
    kernels = cpu_kernels()
    wide = torch.randn(rows, 2, hidden).to(dtype) * 3
    residual = torch.randn(rows, 2, hidden).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    gate_up = torch.randn(rows, 2 * hidden).to(dtype) * 4

    def run():
        x, r = wide.clone()[:, 0], residual.clone()[:, 1]
        normed = torch.empty(rows, hidden, dtype=dtype)
        kernels.rms_norm(normed, x, weight, 1e-5)
        kernels.fused_add_rms_norm(x, r, weight, 1e-5)
        silu = torch.empty(rows, hidden, dtype=dtype)
        kernels.silu_and_mul(silu, gate_up)
        return normed, x, r, silu

    native_results = run()
    _torch_path(monkeypatch)
    for name, got, expected in zip(
        ("rms_norm", "normed", "residual", "silu"), native_results, run(), strict=True
    ):
        assert_close(got, expected, dtype), name
        if dtype != torch.float32:  # float32 keeps the sums' order in its last bits
            assert (got == expected).float().mean() > 0.97, name


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_native_rotary_kv_write_equals_the_torch_kernel(built, monkeypatch, dtype, tokens):
    """Rotation and cache write bit for bit as the PyTorch kernel (the same products and sums, rounded
    alike), for views of one fused q/k/v row and for a query of its own, with and without rotation."""
    kernels = cpu_kernels()
    heads, kv_heads, dim, rows, positions = 6, 2, 80, 3, 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    angles = torch.rand(tokens, dim // 2) * 6
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)
    cache_rows = torch.randint(0, rows, (tokens,))
    cache_positions = torch.randperm(positions)[:tokens]

    def run(rotate: bool):
        fused = qkv.clone()
        query = fused[:, : heads * dim].view(tokens, heads, dim)
        key = fused[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        value = fused[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        caches = [torch.zeros(rows, kv_heads, positions, dim, dtype=dtype) for _ in range(2)]
        if rotate:
            kernels.rotary_embedding_kv_write(query, key, value, cos_sin, *caches, None, None, cache_rows,
                                              cache_positions, "auto")  # fmt: skip
        else:
            kernels.kv_write(key, value, *caches, None, None, cache_rows, cache_positions, "auto")
        return fused, *caches

    native_results = {rotate: run(rotate) for rotate in (True, False)}
    _torch_path(monkeypatch)
    for rotate, results in native_results.items():
        for got, expected in zip(results, run(rotate), strict=True):
            assert torch.equal(got, expected)


def test_rows_of_mixed_dtypes_are_refused_before_any_kernel_reads_them():
    query, key, value, _ = _case((1, 2, 3, 20, 64), torch.bfloat16, False)
    with pytest.raises(ValueError, match="one dtype with head_dim contiguous"):
        rows_attention.attend_rows(query, key.float(), value, 0.125)
    with pytest.raises(ValueError, match="one dtype with head_dim contiguous"):
        rows_attention.attend_rows(query, key, value.transpose(-1, -2), 0.125)
    with pytest.raises(ValueError, match="one dtype with head_dim contiguous"):
        rows_attention.attend_rows(query.transpose(-1, -2), key, value, 0.125)


@pytest.mark.parametrize("with_native", [True, False], ids=["native", "flash"])
def test_rows_attention_writes_into_the_callers_output(built, monkeypatch, with_native):
    """out= takes the output where the caller wants it (decode's [S, H, D] rows, one beam), on both paths;
    an out of another shape or layout is refused."""
    if not with_native:
        _torch_path(monkeypatch)
    query, key, value, first_column = _case((2, 3, 3, 40, 64), torch.bfloat16, True)
    out = torch.full_like(query, float("nan"))
    result, lse = rows_attention.attend_rows(query, key, value, 0.125, first_column, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected_out, expected_lse = _expected(query, key, value, 0.125, first_column)
    assert_close(out, expected_out, torch.bfloat16)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="writes a contiguous"):
        rows_attention.attend_rows(query, key, value, 0.125, first_column, out=out.transpose(1, 2))
