// linear_int4 (docs/ops.md): out[r, n] = sum_k x[r, k] * W[n, k] (+ bias[n]) for up to kMaxRows rows of x
// and a 4-bit weight in xpu_coopt's Int4Weight layout: codes uint8 [N, K/2] (column 2i in the low nibble,
// 2i + 1 in the high one), scales and offsets float32 [N, K/G], W = code * scale + offset in float32.
// A sub-group serves one output feature: its lanes read consecutive code bytes (each a coalesced run of
// 16), dequantize the two codes in registers, multiply them into every row, and reduce once at the end.
#include "common.hpp"

namespace xc {

constexpr int kMaxRows = 16;              // a decode step's rows (batch x beams); prefill runs torch's GEMM
constexpr int kOutputsPerWorkGroup = 4;   // sub-groups a work-group holds, one output feature each

template <typename T>
inline void linear_int4(T* out, const T* x, const uint8_t* codes, const float* scales, const float* offsets,
                        const T* bias, int rows, int outputs, int inputs, int group_size, int64_t out_stride,
                        int64_t x_stride) {
  const auto it = item();
  const auto sg = it.get_sub_group();
  const int n = it.get_group(0) * kOutputsPerWorkGroup + sg.get_group_linear_id();
  if (n >= outputs) return;  // a whole sub-group leaves together: no collective below misses a lane
  const int lane = sg.get_local_linear_id();
  const int bytes = inputs / 2, groups = inputs / group_size;
  const uint8_t* row_codes = codes + static_cast<int64_t>(n) * bytes;
  const float* row_scales = scales + static_cast<int64_t>(n) * groups;
  const float* row_offsets = offsets + static_cast<int64_t>(n) * groups;
  float acc[kMaxRows] = {};
  for (int b = lane; b < bytes; b += kSubGroup) {
    const int code = row_codes[b];
    const int group = 2 * b / group_size;  // groups are even: both codes of a byte share one
    const float scale = row_scales[group], offset = row_offsets[group];
    const float w_even = static_cast<float>(code & 15) * scale + offset;
    const float w_odd = static_cast<float>(code >> 4) * scale + offset;
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= rows) break;
      const T* xr = x + r * x_stride + 2 * b;
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

#define XC_LINEAR_INT4_KERNELS(NAME, T)                                                                          \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void linear_int4_##NAME(                                         \
      T* out, const T* x, const uint8_t* codes, const float* scales, const float* offsets, const T* bias,        \
      int rows, int outputs, int inputs, int group_size, int64_t out_stride, int64_t x_stride) {                 \
    xc::linear_int4<T>(out, x, codes, scales, offsets, bias, rows, outputs, inputs, group_size, out_stride,    \
                       x_stride);                                                                               \
  }

XC_FOR_EACH_DTYPE(XC_LINEAR_INT4_KERNELS)
