"""FP8 KV-cache codes in Triton: uint8 bit patterns of float8_e4m3fn / float8_e5m2, encoded and decoded
with integer operations (as sycl_kernels/common.hpp does), so they behave the same on every GPU
generation, with or without FP8 conversion instructions, and in the interpreter."""

from __future__ import annotations

import triton
import triton.language as tl

from xpu_coopt.ops import fp8

_LAYOUT = {"fp8_e4m3": (1, 3, 7), "fp8_e5m2": (2, 2, 15)}  # kv_dtype -> (FORMAT, mantissa bits, bias)


def codec_constants(kv_dtype: str) -> dict[str, float | int]:
    """The constexpr arguments every kernel touching the cache takes (FORMAT 0: no quantization)."""
    if kv_dtype not in _LAYOUT:
        return dict(FORMAT=0, MANTISSA=0, BIAS=0, FP8_MAX=1.0, MIN_NORMAL=1.0, SUB_SCALE=1.0, SUB_UNIT=1.0)
    format_id, mantissa, bias = _LAYOUT[kv_dtype]
    return dict(
        FORMAT=format_id,
        MANTISSA=mantissa,
        BIAS=bias,
        FP8_MAX=float(fp8.FP8_MAX[kv_dtype]),
        MIN_NORMAL=2.0 ** (1 - bias),  # smallest normal value
        SUB_SCALE=2.0 ** (bias - 1 + mantissa),  # subnormal values are multiples of 1 / SUB_SCALE
        SUB_UNIT=2.0 ** (1 - bias - mantissa),
    )


@triton.jit
def fp8_encode(x, MANTISSA: tl.constexpr, BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
               MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr):  # fmt: skip
    """float32 x, already divided by its scale -> uint8 codes; saturating, round half to even."""
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # Normal range: round float32's mantissa to MANTISSA bits; a carry moves into the exponent.
    shift: tl.constexpr = 23 - MANTISSA
    rounded = (magnitude + ((1 << (shift - 1)) - 1) + ((magnitude >> shift) & 1)) >> shift
    normal = rounded - ((127 - BIAS) << MANTISSA)
    # Subnormal range: adding and subtracting 2^23 rounds a float32 below 2^22 to an integer, half to even.
    scaled = tl.abs(x) * SUB_SCALE
    subnormal = ((scaled + 8388608.0) - 8388608.0).to(tl.uint32)
    code = tl.where(tl.abs(x) < MIN_NORMAL, subnormal, normal)
    return (sign | code).to(tl.uint8)


@triton.jit
def fp8_decode(code, MANTISSA: tl.constexpr, BIAS: tl.constexpr, SUB_UNIT: tl.constexpr):
    """uint8 codes -> float32 values (before the scale)."""
    c = code.to(tl.uint32)
    exponent = (c & 0x7F) >> MANTISSA
    mantissa = c & ((1 << MANTISSA) - 1)
    normal = (((exponent + (127 - BIAS)) << 23) | (mantissa << (23 - MANTISSA))).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * SUB_UNIT, normal)
    return tl.where((c & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def _layout_barrier(values):
    """float16 values unchanged (a register move, which ptxas drops), through an op Triton's optimizer
    does not move (not pure): a conversion before it stays in the layout its codes were loaded in."""
    return tl.inline_asm_elementwise(
        "mov.b32 $0, $1;", "=r,r", [values], dtype=tl.float16, is_pure=False, pack=2
    )


@triton.jit
def decode_codes(codes, OUT: tl.constexpr, MANTISSA: tl.constexpr, BIAS: tl.constexpr, SUB_UNIT: tl.constexpr,
                 NATIVE_FP8: tl.constexpr, UPCAST_IN_REGISTERS: tl.constexpr = False):  # fmt: skip
    """uint8 codes -> their values (before the scale) as OUT, exactly (every FP8 value is a 16-bit float):
    with NATIVE_FP8 through the GPU's FP8 conversion instructions (sm_89 and newer; to float16 one
    instruction per pair of codes), else with integer operations. Both agree on every code the encoder
    writes (it never writes e4m3's NaN codes 0x7f / 0xff, nor e5m2's inf / NaN).

    UPCAST_IN_REGISTERS (compiled GPU code only: the interpreter has no inline assembly): convert in the
    layout the codes were loaded in. Otherwise, when the values feed tl.dot, Triton moves the codes into
    the dot operand's layout and converts there: for an operand whose reduced dimension is not the
    contiguous one (V in p @ V) that reads shared memory a byte at a time (docs/benchmarks.md)."""
    if UPCAST_IN_REGISTERS:
        values = _layout_barrier(decode_codes(codes, tl.float16, MANTISSA, BIAS, SUB_UNIT, NATIVE_FP8)).to(
            OUT
        )
    elif NATIVE_FP8:
        if MANTISSA == 3:
            values = codes.to(tl.float8e4nv, bitcast=True).to(OUT)
        else:
            values = codes.to(tl.float8e5, bitcast=True).to(OUT)
    else:
        values = fp8_decode(codes, MANTISSA, BIAS, SUB_UNIT).to(OUT)
    return values


@triton.jit
def load_unscaled(pointers, mask, scale_pointers, scale_mask, DTYPE: tl.constexpr, FORMAT: tl.constexpr,
                  MANTISSA: tl.constexpr, BIAS: tl.constexpr, SUB_UNIT: tl.constexpr, NATIVE_FP8: tl.constexpr,
                  UPCAST_IN_REGISTERS: tl.constexpr = False):  # fmt: skip
    """(values, scales): cache cells as DTYPE values before their row's scale (FP8 codes convert exactly to
    16-bit floats), and the rows' scales as float32 (ones for a 16-bit cache, which callers skip). For K, whose scale is one
    per key, scores = (q . codes) * scale: one multiply per score instead of one per element."""
    if FORMAT == 0:
        values = tl.load(pointers, mask=mask, other=0.0)
        scales = tl.where(scale_mask, 1.0, 0.0)
    else:
        codes = tl.load(pointers, mask=mask, other=0)
        values = decode_codes(codes, DTYPE, MANTISSA, BIAS, SUB_UNIT, NATIVE_FP8, UPCAST_IN_REGISTERS)
        scales = tl.load(scale_pointers, mask=scale_mask, other=0.0).to(tl.float32)
    return values, scales


@triton.jit
def store_rows(x, mask, pointers, scale_pointers, STATIC_SCALE: tl.constexpr, FORMAT: tl.constexpr, MANTISSA: tl.constexpr,
               BIAS: tl.constexpr, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr):  # fmt: skip
    """Writes rows x [N, D] (float32) to the cache: as they are, or as FP8 codes with one dynamic scale
    per row (amax / FP8_MAX, at least 1e-12, rounded up to a bfloat16 value) stored through scale_pointers
    [N] (bfloat16), or with STATIC_SCALE the scales already there, read and left unchanged."""
    if FORMAT == 0:
        tl.store(pointers, x.to(pointers.dtype.element_ty), mask=mask)
    else:
        row_mask = tl.max(mask.to(tl.int32), axis=1) > 0
        if STATIC_SCALE:
            scale = tl.load(scale_pointers, mask=row_mask, other=1.0).to(tl.float32)
        else:
            amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
            bits = tl.maximum(amax / FP8_MAX, 1e-12).to(tl.int32, bitcast=True)
            scale = ((bits + 0xFFFF) & -65536).to(tl.float32, bitcast=True)  # up to a bfloat16 value
            tl.store(scale_pointers, scale.to(tl.bfloat16), mask=row_mask)  # exact
        codes = fp8_encode(x / scale[:, None], MANTISSA, BIAS, FP8_MAX, MIN_NORMAL, SUB_SCALE)
        tl.store(pointers, codes, mask=mask)
