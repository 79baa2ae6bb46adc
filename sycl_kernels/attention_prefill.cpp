// attention_prefill (docs/ops.md): causal attention over a left-padded batch of prompts, each query over its
// last `window` keys (the host passes a window longer than any prompt for none). The queries are the last
// `queries` of the `columns` key columns (fewer: a prompt continued over K/V of an earlier forward).
// Work-group = (batch row, query head, tile of kQueryRows queries); each sub-group owns one query row.
// The work-group loads each tile of 16 keys and values into local memory once for all its query rows and
// runs an online softmax over the tiles (flash attention), so no score matrix is ever stored.
#include "attention.hpp"

namespace xc {

constexpr int kQueryRows = 8;

template <typename T>
inline void attention_prefill(T* out, const T* query, const T* key, const T* value, const int* seq_start,
                              int queries, int columns, int heads, int kv_heads, int head_dim, float scale, int window,
                              int64_t query_batch_stride, int64_t query_token_stride, int64_t key_batch_stride,
                              int64_t key_token_stride, int64_t value_batch_stride, int64_t value_token_stride,
                              int64_t out_batch_stride, int64_t out_token_stride, T* key_tile, T* value_tile,
                              float* query_rows) {
  const auto it = item();
  const auto wg = it.get_group();
  const auto sg = it.get_sub_group();
  const int lane = sg.get_local_linear_id(), row = sg.get_group_linear_id();
  const int query_tiles = (queries + kQueryRows - 1) / kQueryRows;
  const int offset = columns - queries;  // query i is key column offset + i
  const int64_t group_id = it.get_group(0);
  const int tile = group_id % query_tiles;
  const int h = (group_id / query_tiles) % heads;
  const int64_t b = group_id / (int64_t(query_tiles) * heads);
  const int kv = h / (heads / kv_heads);
  const int start = seq_start[b];
  const int i = tile * kQueryRows + row;  // this sub-group's query
  const int column = offset + i;          // and its key column
  const bool attends = i < queries && column >= start;

  float* q = query_rows + row * kMaxHeadDim;
  for (int d = lane; d < head_dim; d += kSubGroup)
    q[d] = i < queries ? static_cast<float>(query[b * query_batch_stride + i * query_token_stride + h * head_dim + d]) : 0.0f;
  sycl::group_barrier(sg);

  OnlineSoftmax softmax;
  const int last_key = offset + sycl::min(queries, (tile + 1) * kQueryRows) - 1;  // the tile's last query's
  // No key before the padding's end, nor before the window of the tile's first query.
  const int first_key = sycl::max(start, offset + tile * kQueryRows - window + 1);
  for (int first = first_key / kKeyTile * kKeyTile; first <= last_key; first += kKeyTile) {
    sycl::group_barrier(wg);  // the previous tile has been consumed
    for (int index = it.get_local_id(0); index < kKeyTile * head_dim; index += it.get_local_range(0)) {
      const int j = index / head_dim, d = index % head_dim, position = first + j;
      if (position >= columns) continue;
      key_tile[j * kMaxHeadDim + d] = key[b * key_batch_stride + position * key_token_stride + kv * head_dim + d];
      value_tile[j * kMaxHeadDim + d] = value[b * value_batch_stride + position * value_token_stride + kv * head_dim + d];
    }
    sycl::group_barrier(wg);
    const int position = first + lane;
    float score = kMinusInfinity;
    if (attends && position >= start && position <= column && position > column - window)
      score = scale * dot(q, head_dim, [&](int d) { return key_tile[lane * kMaxHeadDim + d]; });
    softmax.add_tile(sg, score, 0, head_dim, [&](int, int j, int column) { return value_tile[j * kMaxHeadDim + column]; });
  }
  if (i < queries) softmax.store(out + b * out_batch_stride + i * out_token_stride + h * head_dim, head_dim, lane);
}

}  // namespace xc

#define XC_ATTENTION_PREFILL_KERNEL(NAME, T)                                                                    \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void attention_prefill_##NAME(                                 \
      T* out, const T* query, const T* key, const T* value, const int* seq_start, int queries, int columns,   \
      int heads, int kv_heads, int head_dim, float scale, int window, int64_t query_batch_stride,            \
      int64_t query_token_stride,                                                                             \
      int64_t key_batch_stride, int64_t key_token_stride, int64_t value_batch_stride,                         \
      int64_t value_token_stride, int64_t out_batch_stride, int64_t out_token_stride) {                       \
    static xc::syclexp::work_group_static<T[xc::kKeyTile * xc::kMaxHeadDim]> key_tile;                         \
    static xc::syclexp::work_group_static<T[xc::kKeyTile * xc::kMaxHeadDim]> value_tile;                       \
    static xc::syclexp::work_group_static<float[xc::kQueryRows * xc::kMaxHeadDim]> query_rows;                 \
    xc::attention_prefill<T>(out, query, key, value, seq_start, queries, columns, heads, kv_heads, head_dim,    \
                             scale, window, query_batch_stride, query_token_stride, key_batch_stride,       \
                             key_token_stride, value_batch_stride, value_token_stride, out_batch_stride, out_token_stride,       \
                             xc::local_array(key_tile), xc::local_array(value_tile), xc::local_array(query_rows)); \
  }

XC_FOR_EACH_DTYPE(XC_ATTENTION_PREFILL_KERNEL)
