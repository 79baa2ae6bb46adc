// rms_norm, fused_add_rms_norm and silu_and_mul (docs/ops.md). One work-group per row for the norms: the
// row's sum of squares is one work-group reduction, then every work-item scales the columns it read.
#include "common.hpp"

namespace xc {

template <typename T>
inline void rms_norm_row(T* out, const T* input, const T* weight, float epsilon, int hidden) {
  const auto it = item();
  const int lane = it.get_local_id(0), width = it.get_local_range(0);
  float squares = 0.0f;
  for (int i = lane; i < hidden; i += width) {
    const float x = input[i];
    squares += x * x;
  }
  squares = sycl::reduce_over_group(it.get_group(), squares, sycl::plus<float>());
  const float inverse_rms = 1.0f / sycl::sqrt(squares / hidden + epsilon);
  // Normalised in float32, rounded to T, then times the weight in T: transformers' LlamaRMSNorm.
  for (int i = lane; i < hidden; i += width)
    out[i] = static_cast<T>(static_cast<float>(weight[i]) * round_to<T>(static_cast<float>(input[i]) * inverse_rms));
}

template <typename T>
inline void rms_norm(T* out, const T* input, const T* weight, float epsilon, int hidden, int64_t out_stride,
                     int64_t in_stride) {
  const int64_t row = item().get_group(0);
  rms_norm_row(out + row * out_stride, input + row * in_stride, weight, epsilon, hidden);
}

template <typename T>
inline void fused_add_rms_norm(T* input, T* residual, const T* weight, float epsilon, int hidden,
                               int64_t in_stride, int64_t residual_stride) {
  const auto it = item();
  const int64_t row = it.get_group(0);
  T* x = input + row * in_stride;
  T* r = residual + row * residual_stride;
  // Each work-item adds the columns it will normalise: no other work-item reads them in between.
  for (int i = it.get_local_id(0); i < hidden; i += it.get_local_range(0))
    r[i] = static_cast<T>(static_cast<float>(r[i]) + static_cast<float>(x[i]));
  rms_norm_row(x, r, weight, epsilon, hidden);
}

template <typename T>
inline void silu_and_mul(T* out, const T* input, int64_t rows, int width, int64_t out_stride, int64_t in_stride) {
  const int64_t index = item().get_global_id(0);
  if (index >= rows * width) return;
  const int64_t row = index / width;
  const int column = index % width;
  const float gate = input[row * in_stride + column];
  const float up = input[row * in_stride + width + column];
  out[row * out_stride + column] = static_cast<T>(round_to<T>(gate / (1.0f + sycl::exp(-gate))) * up);
}

}  // namespace xc

#define XC_NORM_KERNELS(NAME, T)                                                                        \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void rms_norm_##NAME(T* out, const T* input, const T* weight, float epsilon, \
                                                     int hidden, int64_t out_stride, int64_t in_stride) {    \
    xc::rms_norm<T>(out, input, weight, epsilon, hidden, out_stride, in_stride);                             \
  }                                                                                                          \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void fused_add_rms_norm_##NAME(T* input, T* residual, const T* weight,        \
                                                               float epsilon, int hidden, int64_t in_stride, \
                                                               int64_t residual_stride) {                    \
    xc::fused_add_rms_norm<T>(input, residual, weight, epsilon, hidden, in_stride, residual_stride);         \
  }                                                                                                          \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void silu_and_mul_##NAME(T* out, const T* input, int64_t rows, int width,     \
                                                         int64_t out_stride, int64_t in_stride) {            \
    xc::silu_and_mul<T>(out, input, rows, width, out_stride, in_stride);                                     \
  }

XC_FOR_EACH_DTYPE(XC_NORM_KERNELS)
