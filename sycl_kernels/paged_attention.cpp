// paged_attention (docs/ops.md): the serving engine's ragged step, each sequence's queries over its K/V in
// the pool of blocks, read where they lie (position p in cell p % block_size of block
// block_tables[s][p / block_size]). As attention_prefill: work-group = (sequence, query head, tile of
// kQueryRows queries), each sub-group one query row; the work-group loads each tile of 16 keys and values
// (FP8 cells dequantized) into local memory once for all its rows, into an online softmax.
#include "attention.hpp"

namespace xc {

constexpr int kQueryRows = 8;

template <typename T, int Format>
inline void paged_attention(T* out, const T* query, const typename Cache<T, Format>::Cell* k_pool,
                            const typename Cache<T, Format>::Cell* v_pool, const bf16* k_scale, const bf16* v_scale,
                            const int* block_tables, const int* query_start, const int* context_lens, int query_tiles,
                            int heads, int kv_heads, int head_dim, int block_size, float scale, int window,
                            int64_t query_token_stride, int64_t query_head_stride, int64_t out_token_stride,
                            int64_t out_head_stride, int64_t table_stride, int64_t k_block_stride,
                            int64_t k_head_stride, int64_t k_cell_stride, int64_t v_block_stride, int64_t v_head_stride,
                            int64_t v_cell_stride, int64_t k_scale_block_stride, int64_t k_scale_head_stride,
                            int64_t v_scale_block_stride, int64_t v_scale_head_stride, T* key_tile, T* value_tile,
                            float* query_rows) {
  using C = Cache<T, Format>;
  const auto it = item();
  const auto wg = it.get_group();
  const auto sg = it.get_sub_group();
  const int lane = sg.get_local_linear_id(), row = sg.get_group_linear_id();
  const int64_t group_id = it.get_group(0);
  const int tile = group_id % query_tiles;
  const int h = (group_id / query_tiles) % heads;
  const int64_t s = group_id / (int64_t(query_tiles) * heads);
  const int kv = h / (heads / kv_heads);
  const int first_query = query_start[s];
  const int queries = query_start[s + 1] - first_query;
  if (tile * kQueryRows >= queries) return;  // the whole work-group: the grid covers the longest sequence
  const int context = context_lens[s];
  const int offset = context - queries;  // query i is position offset + i
  const int i = tile * kQueryRows + row;
  const int column = offset + i;
  const bool attends = i < queries;

  float* q = query_rows + row * kMaxHeadDim;
  for (int d = lane; d < head_dim; d += kSubGroup)
    q[d] = attends ? static_cast<float>(query[(first_query + i) * query_token_stride + h * query_head_stride + d]) : 0.0f;
  sycl::group_barrier(sg);

  OnlineSoftmax softmax;
  const int last_key = offset + sycl::min(queries, (tile + 1) * kQueryRows) - 1;  // the tile's last query's
  const int first_key = sycl::max(0, offset + tile * kQueryRows - window + 1);      // its first query's window
  const int* table = block_tables + s * table_stride;
  for (int first = first_key / kKeyTile * kKeyTile; first <= last_key; first += kKeyTile) {
    sycl::group_barrier(wg);  // the previous tile has been consumed
    for (int index = it.get_local_id(0); index < kKeyTile * head_dim; index += it.get_local_range(0)) {
      const int j = index / head_dim, d = index % head_dim, position = first + j;
      if (position >= context) continue;
      const int64_t block = table[position / block_size];
      const int cell = position % block_size;
      const float ks = Format ? float(k_scale[block * k_scale_block_stride + kv * k_scale_head_stride + cell]) : 0.0f;
      const float vs = Format ? float(v_scale[block * v_scale_block_stride + kv * v_scale_head_stride + cell]) : 0.0f;
      key_tile[j * kMaxHeadDim + d] = C::load(k_pool + block * k_block_stride + kv * k_head_stride + cell * k_cell_stride + d, ks);
      value_tile[j * kMaxHeadDim + d] = C::load(v_pool + block * v_block_stride + kv * v_head_stride + cell * v_cell_stride + d, vs);
    }
    sycl::group_barrier(wg);
    const int position = first + lane;
    float score = kMinusInfinity;
    if (attends && position <= column && position > column - window)
      score = scale * dot(q, head_dim, [&](int d) { return key_tile[lane * kMaxHeadDim + d]; });
    softmax.add_tile(sg, score, 0, head_dim, [&](int, int j, int c) { return value_tile[j * kMaxHeadDim + c]; });
  }
  if (attends) softmax.store(out + (first_query + i) * out_token_stride + h * out_head_stride, head_dim, lane);
}

}  // namespace xc

#define XC_PAGED_ATTENTION_KERNEL(NAME, T, FORMAT)                                                              \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void paged_attention_##NAME(                                   \
      T* out, const T* query, const xc::Cache<T, FORMAT>::Cell* k_pool, const xc::Cache<T, FORMAT>::Cell* v_pool, \
      const xc::bf16* k_scale, const xc::bf16* v_scale, const int* block_tables, const int* query_start,      \
      const int* context_lens, int query_tiles, int heads, int kv_heads, int head_dim, int block_size,        \
      float scale, int window, int64_t query_token_stride, int64_t query_head_stride, int64_t out_token_stride, \
      int64_t out_head_stride, int64_t table_stride, int64_t k_block_stride, int64_t k_head_stride,           \
      int64_t k_cell_stride, int64_t v_block_stride, int64_t v_head_stride, int64_t v_cell_stride,            \
      int64_t k_scale_block_stride, int64_t k_scale_head_stride, int64_t v_scale_block_stride,                \
      int64_t v_scale_head_stride) {                                                                          \
    static xc::syclexp::work_group_static<T[xc::kKeyTile * xc::kMaxHeadDim]> key_tile;                         \
    static xc::syclexp::work_group_static<T[xc::kKeyTile * xc::kMaxHeadDim]> value_tile;                       \
    static xc::syclexp::work_group_static<float[xc::kQueryRows * xc::kMaxHeadDim]> query_rows;                 \
    xc::paged_attention<T, FORMAT>(                                                                           \
        out, query, k_pool, v_pool, k_scale, v_scale, block_tables, query_start, context_lens, query_tiles,   \
        heads, kv_heads, head_dim, block_size, scale, window, query_token_stride, query_head_stride,          \
        out_token_stride, out_head_stride, table_stride, k_block_stride, k_head_stride, k_cell_stride,       \
        v_block_stride, v_head_stride, v_cell_stride, k_scale_block_stride, k_scale_head_stride,              \
        v_scale_block_stride, v_scale_head_stride, xc::local_array(key_tile), xc::local_array(value_tile),    \
        xc::local_array(query_rows));                                                                         \
  }

XC_FOR_EACH_DTYPE_AND_FORMAT(XC_PAGED_ATTENTION_KERNEL)
