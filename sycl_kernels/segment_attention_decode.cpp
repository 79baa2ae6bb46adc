// segment_attention_decode (docs/ops.md): one new query token per sequence over the segment KV cache.
// Work-group = (request, KV head): its sub-groups are every (beam, query head of the group) row of that
// request, so each prompt K/V row is loaded (and FP8-dequantized) into local memory once and used by all
// of them. Then each sub-group reads its own beam's response rows, found through beam_slots.
#include "attention.hpp"

namespace xc {

// Rows (beams x query heads per KV head) one work-group serves: one sub-group each.
constexpr int kMaxRows = 32;

template <typename T, int Format>
inline void segment_attention_decode(
    T* out, const T* query, const typename Cache<T, Format>::Cell* prompt_k,
    const typename Cache<T, Format>::Cell* prompt_v, const bf16* prompt_k_scale, const bf16* prompt_v_scale,
    const int* prompt_start, const typename Cache<T, Format>::Cell* response_k,
    const typename Cache<T, Format>::Cell* response_v, const bf16* response_k_scale,
    const bf16* response_v_scale, const int* beam_slots, int beams, int kv_heads, int group, int head_dim,
    int prompt_len, int response_len, float scale, int64_t query_stride, int64_t out_stride,
    int64_t prompt_request_stride, int64_t prompt_head_stride, int64_t prompt_position_stride,
    int64_t prompt_scale_request_stride, int64_t prompt_scale_head_stride, int64_t prompt_scale_position_stride,
    int64_t response_row_stride, int64_t response_head_stride, int64_t response_position_stride,
    int64_t response_scale_row_stride, int64_t response_scale_head_stride,
    int64_t response_scale_position_stride, int64_t beam_slots_stride, T* key_tile, T* value_tile,
    float* query_rows) {
  using C = Cache<T, Format>;
  const auto it = item();
  const auto wg = it.get_group();
  const auto sg = it.get_sub_group();
  const int lane = sg.get_local_linear_id(), row = sg.get_group_linear_id();
  const int64_t request = it.get_group(0) / kv_heads;
  const int kv = it.get_group(0) % kv_heads;
  const int64_t sequence = request * beams + row / group;
  const int h = kv * group + row % group;

  float* q = query_rows + row * kMaxHeadDim;
  for (int d = lane; d < head_dim; d += kSubGroup) q[d] = query[sequence * query_stride + h * head_dim + d];
  sycl::group_barrier(sg);

  OnlineSoftmax softmax;
  // Prompt segment, shared by the request's beams: positions before `start` are padding, never read.
  const int start = prompt_start[request];
  const int64_t prompt_at = request * prompt_request_stride + kv * prompt_head_stride;
  const int64_t prompt_scale_at = request * prompt_scale_request_stride + kv * prompt_scale_head_stride;
  for (int first = start / kKeyTile * kKeyTile; first < prompt_len; first += kKeyTile) {
    sycl::group_barrier(wg);  // the previous tile has been consumed
    for (int index = it.get_local_id(0); index < kKeyTile * head_dim; index += it.get_local_range(0)) {
      const int j = index / head_dim, d = index % head_dim, position = first + j;
      if (position < start || position >= prompt_len) continue;
      const int64_t cell = prompt_at + position * prompt_position_stride + d;
      const int64_t at = prompt_scale_at + position * prompt_scale_position_stride;
      key_tile[j * kMaxHeadDim + d] = C::load(prompt_k + cell, Format ? float(prompt_k_scale[at]) : 0.0f);
      value_tile[j * kMaxHeadDim + d] = C::load(prompt_v + cell, Format ? float(prompt_v_scale[at]) : 0.0f);
    }
    sycl::group_barrier(wg);
    const int position = first + lane;
    float score = kMinusInfinity;
    if (position >= start && position < prompt_len)
      score = scale * dot(q, head_dim, [&](int d) { return key_tile[lane * kMaxHeadDim + d]; });
    softmax.add_tile(sg, score, 0, head_dim, [&](int, int j, int column) { return value_tile[j * kMaxHeadDim + column]; });
  }

  // Response segment: step t of this sequence lives in row beam_slots[sequence, t]; read straight from the
  // cache (these rows are this beam's alone, so there is nothing to share through local memory).
  const int* slots = beam_slots + sequence * beam_slots_stride;
  const int64_t response_at = kv * response_head_stride;
  const int64_t response_scale_at = kv * response_scale_head_stride;
  auto cell = [&](int slot, int t) { return response_at + slot * response_row_stride + t * response_position_stride; };
  auto scale_of = [&](const bf16* scales, int slot, int t) {
    return Format ? (float)scales[response_scale_at + slot * response_scale_row_stride + t * response_scale_position_stride] : 0.0f;
  };
  for (int first = 0; first < response_len; first += kKeyTile) {
    const int t = first + lane;
    const int slot = t < response_len ? slots[t] : 0;
    float score = kMinusInfinity;
    if (t < response_len) {
      const float k_scale = scale_of(response_k_scale, slot, t);
      score = scale * dot(q, head_dim, [&](int d) { return C::load(response_k + cell(slot, t) + d, k_scale); });
    }
    softmax.add_tile(sg, score, slot, head_dim, [&](int slot_j, int j, int column) {
      return C::load(response_v + cell(slot_j, first + j) + column, scale_of(response_v_scale, slot_j, first + j));
    });
  }
  softmax.store(out + sequence * out_stride + h * head_dim, head_dim, lane);
}

}  // namespace xc

#define XC_SEGMENT_ATTENTION_DECODE_KERNEL(NAME, T, FORMAT)                                                     \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void segment_attention_decode_##NAME(                          \
      T* out, const T* query, const xc::Cache<T, FORMAT>::Cell* prompt_k,                                     \
      const xc::Cache<T, FORMAT>::Cell* prompt_v, const xc::bf16* prompt_k_scale, const xc::bf16* prompt_v_scale, \
      const int* prompt_start, const xc::Cache<T, FORMAT>::Cell* response_k,                                  \
      const xc::Cache<T, FORMAT>::Cell* response_v, const xc::bf16* response_k_scale,                         \
      const xc::bf16* response_v_scale, const int* beam_slots, int beams, int kv_heads, int group, int head_dim, \
      int prompt_len, int response_len, float scale, int64_t query_stride, int64_t out_stride,              \
      int64_t prompt_request_stride, int64_t prompt_head_stride, int64_t prompt_position_stride,             \
      int64_t prompt_scale_request_stride, int64_t prompt_scale_head_stride,                                \
      int64_t prompt_scale_position_stride, int64_t response_row_stride, int64_t response_head_stride,       \
      int64_t response_position_stride, int64_t response_scale_row_stride,                                  \
      int64_t response_scale_head_stride, int64_t response_scale_position_stride,                           \
      int64_t beam_slots_stride) {                                                                           \
    static xc::syclexp::work_group_static<T[xc::kKeyTile * xc::kMaxHeadDim]> key_tile;                         \
    static xc::syclexp::work_group_static<T[xc::kKeyTile * xc::kMaxHeadDim]> value_tile;                       \
    static xc::syclexp::work_group_static<float[xc::kMaxRows * xc::kMaxHeadDim]> query_rows;                   \
    xc::segment_attention_decode<T, FORMAT>(                                                                   \
        out, query, prompt_k, prompt_v, prompt_k_scale, prompt_v_scale, prompt_start, response_k, response_v, \
        response_k_scale, response_v_scale, beam_slots, beams, kv_heads, group, head_dim, prompt_len,         \
        response_len, scale, query_stride, out_stride, prompt_request_stride, prompt_head_stride,             \
        prompt_position_stride, prompt_scale_request_stride, prompt_scale_head_stride,                        \
        prompt_scale_position_stride, response_row_stride, response_head_stride, response_position_stride,    \
        response_scale_row_stride, response_scale_head_stride, response_scale_position_stride,                \
        beam_slots_stride, xc::local_array(key_tile), xc::local_array(value_tile), xc::local_array(query_rows)); \
  }

XC_FOR_EACH_DTYPE_AND_FORMAT(XC_SEGMENT_ATTENTION_DECODE_KERNEL)
