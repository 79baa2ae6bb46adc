// rotary_embedding_kv_write and kv_write (docs/ops.md): one work-group per token. Its sub-groups first
// rotate the token's query and key heads in place (rotary only), then each writes one K or V head row into
// the cache, quantizing it to FP8 with a per-row scale found by a sub-group max reduction (or, with
// static_scale, the scale already stored for that cell: a per-tensor scale broadcast with zero strides).
#include "common.hpp"

namespace xc {

// Rotate-half with every product rounded to T, as transformers does it in T (exact same bits).
template <typename T>
inline void rotate_row(T* x, const T* cos_sin, int head_dim, int lane) {
  const int half_dim = head_dim / 2;
  for (int j = lane; j < half_dim; j += kSubGroup) {
    const float c = cos_sin[j], s = cos_sin[half_dim + j];
    const float x1 = x[j], x2 = x[half_dim + j];
    x[j] = static_cast<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
    x[half_dim + j] = static_cast<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  }
}

template <typename T, int Format>
inline void write_row(const T* source, typename Cache<T, Format>::Cell* cell, bf16* scale, int static_scale,
                      int head_dim, sycl::sub_group sg) {
  const int lane = sg.get_local_linear_id();
  if constexpr (Format == 0) {
    for (int i = lane; i < head_dim; i += kSubGroup) cell[i] = source[i];
  } else {
    float row_scale;
    if (static_scale) {
      row_scale = static_cast<float>(*scale);
    } else {
      float amax = 0.0f;
      for (int i = lane; i < head_dim; i += kSubGroup) amax = sycl::fmax(amax, sycl::fabs(static_cast<float>(source[i])));
      amax = sycl::reduce_over_group(sg, amax, sycl::maximum<float>());
      row_scale = round_up_to_bf16(sycl::fmax(amax / Fp8<Format>::kMax, 1e-12f));
      if (lane == 0) *scale = bf16(row_scale);  // exact: row_scale is a bfloat16 value
    }
    for (int i = lane; i < head_dim; i += kSubGroup) cell[i] = fp8_encode<Format>(static_cast<float>(source[i]) / row_scale);
  }
}

// Strides are in elements; the last dimension of every tensor is contiguous. cache_strides and
// scale_strides are (row, head, position) and shared by the K and V caches (and their scales).
template <typename T, int Format>
inline void rotary_kv_write(T* query, T* key, const T* value, const T* cos_sin,
                            typename Cache<T, Format>::Cell* k_cache, typename Cache<T, Format>::Cell* v_cache,
                            bf16* k_scale, bf16* v_scale, const int64_t* cache_rows,
                            const int64_t* cache_positions, int rotate, int static_scale, int heads, int kv_heads, int head_dim,
                            int64_t query_token_stride, int64_t key_token_stride, int64_t value_token_stride,
                            int64_t cos_sin_stride, int64_t cache_row_stride, int64_t cache_head_stride,
                            int64_t cache_position_stride, int64_t scale_row_stride, int64_t scale_head_stride,
                            int64_t scale_position_stride) {
  const auto it = item();
  const auto sg = it.get_sub_group();
  const int64_t token = it.get_group(0);
  const int lane = sg.get_local_linear_id();
  const int sub_group = sg.get_group_linear_id(), sub_groups = sg.get_group_linear_range();
  T* token_key = key + token * key_token_stride;
  if (rotate) {
    for (int h = sub_group; h < heads + kv_heads; h += sub_groups) {
      T* row = h < heads ? query + token * query_token_stride + int64_t(h) * head_dim
                         : token_key + int64_t(h - heads) * head_dim;
      rotate_row(row, cos_sin + token * cos_sin_stride, head_dim, lane);
    }
    sycl::group_barrier(it.get_group());  // the rotated key rows are read back by other sub-groups
  }
  const int64_t cache_at = cache_rows[token] * cache_row_stride + cache_positions[token] * cache_position_stride;
  const int64_t scale_at = cache_rows[token] * scale_row_stride + cache_positions[token] * scale_position_stride;
  for (int i = sub_group; i < 2 * kv_heads; i += sub_groups) {
    const bool is_key = i < kv_heads;
    const int h = is_key ? i : i - kv_heads;
    const T* source = is_key ? token_key + int64_t(h) * head_dim
                             : value + token * value_token_stride + int64_t(h) * head_dim;
    auto* cell = (is_key ? k_cache : v_cache) + cache_at + h * cache_head_stride;
    bf16* scale = Format == 0 ? nullptr : (is_key ? k_scale : v_scale) + scale_at + h * scale_head_stride;
    write_row<T, Format>(source, cell, scale, static_scale, head_dim, sg);
  }
}

}  // namespace xc

#define XC_KV_WRITE_KERNEL(NAME, T, FORMAT)                                                                   \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void rotary_kv_write_##NAME(                                 \
      T* query, T* key, const T* value, const T* cos_sin, xc::Cache<T, FORMAT>::Cell* k_cache,              \
      xc::Cache<T, FORMAT>::Cell* v_cache, xc::bf16* k_scale, xc::bf16* v_scale, const int64_t* cache_rows,  \
      const int64_t* cache_positions, int rotate, int static_scale, int heads, int kv_heads, int head_dim, \
      int64_t query_token_stride, int64_t key_token_stride, int64_t value_token_stride,                    \
      int64_t cos_sin_stride, int64_t cache_row_stride, int64_t cache_head_stride,                         \
      int64_t cache_position_stride, int64_t scale_row_stride, int64_t scale_head_stride,                  \
      int64_t scale_position_stride) {                                                                     \
    xc::rotary_kv_write<T, FORMAT>(query, key, value, cos_sin, k_cache, v_cache, k_scale, v_scale, cache_rows, \
                                   cache_positions, rotate, static_scale, heads, kv_heads, head_dim, query_token_stride,  \
                                   key_token_stride, value_token_stride, cos_sin_stride, cache_row_stride, \
                                   cache_head_stride, cache_position_stride, scale_row_stride,             \
                                   scale_head_stride, scale_position_stride);                              \
  }

XC_FOR_EACH_DTYPE_AND_FORMAT(XC_KV_WRITE_KERNEL)
