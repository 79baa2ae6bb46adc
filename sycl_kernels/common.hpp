// Shared by every xpu_coopt SYCL kernel: kernel properties, dtype conversions and the FP8 codecs.
//
// Kernels are free functions (sycl_ext_oneapi_free_function_kernels) compiled at run time by SYCL-RTC;
// each source file instantiates its templates once per activation dtype / KV format under extern "C"
// names ("<op>_<dtype>[_<kv_dtype>]") that xpu_coopt/backends/sycl/kernels.py looks up.
#pragma once

#include <sycl/sycl.hpp>

#include <cstdint>

namespace xc {

namespace syclext = sycl::ext::oneapi;
namespace syclexp = sycl::ext::oneapi::experimental;
using half = sycl::half;

// bfloat16 with conversions written out (round to nearest even, as torch): sycl::ext::oneapi::bfloat16
// conversions crash the runtime compiler of intel-sycl-rt 2026.2 (see docs/xpu.md).
struct bf16 {
  uint16_t bits;
  bf16() = default;
  bf16(float x) {
    const uint32_t u = sycl::bit_cast<uint32_t>(x);
    bits = x != x ? static_cast<uint16_t>((u >> 16) | 0x40u)  // NaN stays a (quiet) NaN
                  : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const { return sycl::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
};

// Every kernel runs sub-groups of 16 work-items: supported by Intel GPUs (Xe, Xe-HPC) and the CPU device.
constexpr int kSubGroup = 16;
// The largest head_dim the attention kernels hold in local memory and registers (every LLaMA, Mistral and
// Qwen2 size is at most 128); each lane of a sub-group owns head_dim / 16 of a row's output columns.
constexpr int kMaxHeadDim = 128;
constexpr int kColumnsPerLane = kMaxHeadDim / kSubGroup;

#define XC_ND_RANGE_KERNEL SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
#define XC_SUB_GROUP_16 SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::sub_group_size<16>))

inline sycl::nd_item<1> item() { return syclext::this_work_item::get_nd_item<1>(); }

// The first element of a work_group_static array (declared in the kernel body, where it must live).
template <typename E, size_t N>
inline E* local_array(syclexp::work_group_static<E[N]>& storage) {
  E(&elements)[N] = storage;
  return elements;
}

// Rounds a float to the activation dtype T and back: the reference does each step in T, so do we.
template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// ---- FP8 codes (uint8 bit patterns of float8_e4m3fn / float8_e5m2) ---------------------------------
// Written by hand: the SYCL FP8 types crash the SPIR-V writer. Format 1 = e4m3fn, 2 = e5m2.

template <int Format>
struct Fp8;

template <>
struct Fp8<1> {
  static constexpr int kMantissa = 3, kBias = 7;
  static constexpr float kMax = 448.0f;
};

template <>
struct Fp8<2> {
  static constexpr int kMantissa = 2, kBias = 15;
  static constexpr float kMax = 57344.0f;
};

// x: already divided by the scale. Saturates to +-kMax, rounds to nearest even (as torch's cast).
template <int Format>
inline uint8_t fp8_encode(float x) {
  using F = Fp8<Format>;
  x = sycl::fmin(sycl::fmax(x, -F::kMax), F::kMax);
  const uint32_t bits = sycl::bit_cast<uint32_t>(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  const float min_normal = sycl::ldexp(1.0f, 1 - F::kBias);
  uint32_t code;
  if (sycl::fabs(x) < min_normal) {
    // Subnormal (or zero): a multiple of 2^(1 - bias - mantissa); rint rounds half to even.
    code = static_cast<uint32_t>(sycl::rint(sycl::fabs(x) * sycl::ldexp(1.0f, F::kBias - 1 + F::kMantissa)));
  } else {
    // Normal: round the float32 mantissa to kMantissa bits (half to even); a carry bumps the exponent.
    constexpr int shift = 23 - F::kMantissa;
    const uint32_t rounded = (magnitude + ((1u << (shift - 1)) - 1u) + ((magnitude >> shift) & 1u)) >> shift;
    code = rounded - (static_cast<uint32_t>(127 - F::kBias) << F::kMantissa);
  }
  return static_cast<uint8_t>(sign | code);
}

template <int Format>
inline float fp8_decode(uint8_t code) {
  using F = Fp8<Format>;
  const int exponent = (code & 0x7f) >> F::kMantissa;
  const int mantissa = code & ((1 << F::kMantissa) - 1);
  const float magnitude = exponent == 0
                              ? sycl::ldexp(static_cast<float>(mantissa), 1 - F::kBias - F::kMantissa)
                              : sycl::ldexp(1.0f + mantissa / float(1 << F::kMantissa), exponent - F::kBias);
  return (code & 0x80) ? -magnitude : magnitude;
}

// Positive x rounded up to the next bfloat16 value: FP8 scales are stored in bfloat16, rounded up so the
// row's largest element still fits the format's range (the reference does the same bit operation).
inline float round_up_to_bf16(float x) {
  return sycl::bit_cast<float>((sycl::bit_cast<uint32_t>(x) + 0xffffu) & 0xffff0000u);
}

// ---- KV cache cells: the activation dtype itself (Format 0) or FP8 codes with a bfloat16 scale ------

// load() returns the value in T, as the reference dequantizes (code * scale, rounded to T) before use.
template <typename T, int Format>
struct Cache {
  using Cell = uint8_t;
  static inline T load(const Cell* cell, float scale) { return static_cast<T>(fp8_decode<Format>(*cell) * scale); }
};

template <typename T>
struct Cache<T, 0> {
  using Cell = T;
  static inline T load(const Cell* cell, float) { return *cell; }
};

// Instantiates MACRO(name, T) for every activation dtype, and MACRO(name, T, Format) for every
// (activation dtype, KV format) pair: the extern "C" kernel names the Python side looks up.
#define XC_FOR_EACH_DTYPE(MACRO) MACRO(f32, float) MACRO(f16, xc::half) MACRO(bf16, xc::bf16)
#define XC_FOR_EACH_DTYPE_AND_FORMAT(MACRO)                                                   \
  MACRO(f32_auto, float, 0) MACRO(f16_auto, xc::half, 0) MACRO(bf16_auto, xc::bf16, 0)           \
  MACRO(f32_fp8_e4m3, float, 1) MACRO(f16_fp8_e4m3, xc::half, 1) MACRO(bf16_fp8_e4m3, xc::bf16, 1) \
  MACRO(f32_fp8_e5m2, float, 2) MACRO(f16_fp8_e5m2, xc::half, 2) MACRO(bf16_fp8_e5m2, xc::bf16, 2)

}  // namespace xc
