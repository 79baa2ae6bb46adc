// linear_int4, linear_int8 (docs/ops.md): out[r, n] = sum_k x[r, k] * W[n, k] (+ bias[n]) for up to kMaxRows
// rows of x and a quantized weight in xpu_coopt's layouts, dequantized in float32:
//   Int4Weight: codes uint8 [N, K/2] (column 2i in the low nibble, 2i + 1 in the high one), scales and
//               offsets float32 [N, K/G], W = code * scale + offset;
//   Int8Weight: codes int8 [N, K], scales float32 [N, K/G], W = code * scale.
// A sub-group serves one output feature: its lanes read consecutive pairs of codes (a 4-bit byte or two
// 8-bit ones: coalesced runs), dequantize them in registers, multiply them into every row, and reduce
// once at the end.
#include "common.hpp"

namespace xc {

constexpr int kMaxRows = 16;              // a decode step's rows (batch x beams); prefill runs torch's GEMM
constexpr int kOutputsPerWorkGroup = 4;   // sub-groups a work-group holds, one output feature each

// The two weights of columns 2 pair and 2 pair + 1 of a row, before scaling.
template <int Bits>
inline void code_pair(const void* row_codes, int pair, float& even, float& odd) {
  if constexpr (Bits == 4) {
    const int code = static_cast<const uint8_t*>(row_codes)[pair];
    even = static_cast<float>(code & 15);
    odd = static_cast<float>(code >> 4);
  } else {
    const int8_t* codes = static_cast<const int8_t*>(row_codes) + 2 * pair;
    even = static_cast<float>(codes[0]);
    odd = static_cast<float>(codes[1]);
  }
}

template <typename T, int Bits>
inline void linear_quantized(T* out, const T* x, const void* codes, const float* scales, const float* offsets,
                             const T* bias, int rows, int outputs, int inputs, int group_size,
                             int64_t out_stride, int64_t x_stride) {
  const auto it = item();
  const auto sg = it.get_sub_group();
  const int n = it.get_group(0) * kOutputsPerWorkGroup + sg.get_group_linear_id();
  if (n >= outputs) return;  // a whole sub-group leaves together: no collective below misses a lane
  const int lane = sg.get_local_linear_id();
  const int pairs = inputs / 2, groups = inputs / group_size;
  const int64_t row_bytes = Bits == 4 ? pairs : inputs;
  const void* row_codes = static_cast<const uint8_t*>(codes) + static_cast<int64_t>(n) * row_bytes;
  const float* row_scales = scales + static_cast<int64_t>(n) * groups;
  const float* row_offsets = Bits == 4 ? offsets + static_cast<int64_t>(n) * groups : nullptr;
  float acc[kMaxRows] = {};
  for (int p = lane; p < pairs; p += kSubGroup) {
    const int group = 2 * p / group_size;  // groups are even: both codes of a pair share one
    const float scale = row_scales[group];
    const float offset = Bits == 4 ? row_offsets[group] : 0.0f;
    float w_even, w_odd;
    code_pair<Bits>(row_codes, p, w_even, w_odd);
    w_even = w_even * scale + offset;
    w_odd = w_odd * scale + offset;
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= rows) break;
      const T* xr = x + r * x_stride + 2 * p;
      acc[r] += w_even * static_cast<float>(xr[0]) + w_odd * static_cast<float>(xr[1]);
    }
  }
  const float added = bias ? static_cast<float>(bias[n]) : 0.0f;
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= rows) break;
    const float sum = sycl::reduce_over_group(sg, acc[r], sycl::plus<float>());
    if (lane == 0) out[r * out_stride + n] = static_cast<T>(sum + added);
  }
}

}  // namespace xc

#define XC_LINEAR_QUANTIZED_KERNELS(NAME, T)                                                                    \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void linear_int4_##NAME(                                         \
      T* out, const T* x, const uint8_t* codes, const float* scales, const float* offsets, const T* bias,        \
      int rows, int outputs, int inputs, int group_size, int64_t out_stride, int64_t x_stride) {                 \
    xc::linear_quantized<T, 4>(out, x, codes, scales, offsets, bias, rows, outputs, inputs, group_size,        \
                               out_stride, x_stride);                                                          \
  }                                                                                                              \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void linear_int8_##NAME(                                         \
      T* out, const T* x, const int8_t* codes, const float* scales, const float* offsets, const T* bias,         \
      int rows, int outputs, int inputs, int group_size, int64_t out_stride, int64_t x_stride) {                 \
    xc::linear_quantized<T, 8>(out, x, codes, scales, offsets, bias, rows, outputs, inputs, group_size,        \
                               out_stride, x_stride);                                                          \
  }

XC_FOR_EACH_DTYPE(XC_LINEAR_QUANTIZED_KERNELS)
