// segment_attention_decode (docs/ops.md): one new query token per sequence over the segment KV cache.
// Work-group = (request, KV head, row chunk, split): its sub-groups are (beam, query head of the group)
// rows of that request, all of them where they fit in one work-group (the usual case), so each prompt K/V
// row is loaded (and FP8-dequantized) into local memory once and used by all of them; otherwise chunk c
// serves rows [c * rows_per_chunk, (c + 1) * rows_per_chunk) of the beams x group (decode_split.chunk_rows),
// and the chunks each load the prompt. Then each sub-group reads its own beam's response rows, found
// through beam_slots.
// Split decoding (flash-decoding): split k covers the k-th of equal shares of the request's prompt tiles,
// from its first non-padding tile to the segment's end, and an equal share of the response steps, so that
// a batch-1 step has enough work-groups to fill the GPU (one per (request, KV head) gives Llama-3-8B 8).
// With several splits each writes its softmax partials, and combine_splits merges them into the output.
// A paged prompt segment (block_table not null) is a pool of blocks of block_size columns, a multiple of
// kKeyTile: each tile lies in one block, looked up once per tile. Otherwise block_size is the segment's
// columns, a ring under a window (docs/ops.md).
// Sliding window: a sequence attends to its last `window` columns (prompt columns, then response steps);
// the host passes a window longer than any sequence for none.
#include "attention.hpp"

namespace xc {

template <typename T, int Format>
inline void segment_attention_decode(
    T* out, const T* query, const typename Cache<T, Format>::Cell* prompt_k,
    const typename Cache<T, Format>::Cell* prompt_v, const bf16* prompt_k_scale, const bf16* prompt_v_scale,
    const int* prompt_start, const typename Cache<T, Format>::Cell* response_k,
    const typename Cache<T, Format>::Cell* response_v, const bf16* response_k_scale,
    const bf16* response_v_scale, const int* beam_slots, int beams, int kv_heads, int group, int row_chunks,
    int rows_per_chunk, int head_dim, int prompt_len, int response_len, int response_cells, int window, float scale,
    int64_t query_stride, int64_t out_stride,
    int64_t prompt_request_stride, int64_t prompt_head_stride, int64_t prompt_position_stride,
    int64_t prompt_scale_request_stride, int64_t prompt_scale_head_stride, int64_t prompt_scale_position_stride,
    int64_t response_row_stride, int64_t response_head_stride, int64_t response_position_stride,
    int64_t response_scale_row_stride, int64_t response_scale_head_stride,
    int64_t response_scale_position_stride, int64_t beam_slots_stride, const int* block_table,
    int64_t block_table_stride, int block_size, int splits, int64_t rows_per_split, float* partial_acc,
    float* partial_stats, T* key_tile, T* value_tile, float* query_rows) {
  using C = Cache<T, Format>;
  const auto it = item();
  const auto wg = it.get_group();
  const auto sg = it.get_sub_group();
  const int lane = sg.get_local_linear_id(), row = sg.get_group_linear_id();
  const int64_t program = it.get_group(0) / splits;  // (request, KV head, row chunk)
  const int split = it.get_group(0) % splits;
  const int64_t pair = program / row_chunks;
  const int64_t request = pair / kv_heads;
  const int kv = pair % kv_heads;
  // This sub-group's row of the request's beams x group; the last chunk's spare sub-groups take part in
  // the work-group's tile loads and barriers but read no response row and store nothing.
  const int request_row = (program % row_chunks) * rows_per_chunk + row;
  const bool active = request_row < beams * group;
  const int64_t sequence = request * beams + request_row / group;
  const int h = kv * group + request_row % group;

  float* q = query_rows + row * kMaxHeadDim;
  for (int d = lane; d < head_dim; d += kSubGroup)
    q[d] = active ? float(query[sequence * query_stride + h * head_dim + d]) : 0.0f;
  sycl::group_barrier(sg);

  OnlineSoftmax softmax;
  // Prompt segment, shared by the request's beams: positions before `start` are padding or before the
  // window (negative when no column is dropped), never read. This split's share of the tiles after them
  // (the skipped tiles would leave splits idle).
  const int window_first = prompt_len + response_len - window;
  const int start = sycl::min(sycl::max(prompt_start[request], window_first), prompt_len);
  const int padding_tiles = start / kKeyTile, end_tile = (prompt_len + kKeyTile - 1) / kKeyTile;
  const int tiles = (end_tile - padding_tiles + splits - 1) / splits;
  const int own_first = padding_tiles + split * tiles;
  const int end = sycl::min((own_first + tiles) * kKeyTile, prompt_len);
  for (int first = own_first * kKeyTile; first < end; first += kKeyTile) {
    // The tile's cache row and first column: the request's own row, or the block that holds the tile
    // (it holds a column after `start`, so the request's table names it). Without a table the row is a
    // ring of block_size columns (column n held at n % block_size), which a tile may wrap around; a
    // block holds whole tiles.
    const int64_t row = block_table ? block_table[request * block_table_stride + first / block_size] : request;
    const int column = first % block_size;
    const int64_t row_at = row * prompt_request_stride + kv * prompt_head_stride;
    const int64_t row_scale_at = row * prompt_scale_request_stride + kv * prompt_scale_head_stride;
    sycl::group_barrier(wg);  // the previous tile has been consumed
    for (int index = it.get_local_id(0); index < kKeyTile * head_dim; index += it.get_local_range(0)) {
      const int j = index / head_dim, d = index % head_dim, position = first + j;
      if (position < start || position >= end) continue;
      const int held_at = column + j < block_size ? column + j : column + j - block_size;
      const int64_t cell = row_at + held_at * prompt_position_stride + d;
      const int64_t at = row_scale_at + held_at * prompt_scale_position_stride;
      key_tile[j * kMaxHeadDim + d] = C::load(prompt_k + cell, Format ? float(prompt_k_scale[at]) : 0.0f);
      value_tile[j * kMaxHeadDim + d] = C::load(prompt_v + cell, Format ? float(prompt_v_scale[at]) : 0.0f);
    }
    sycl::group_barrier(wg);
    const int position = first + lane;
    float score = kMinusInfinity;
    if (position >= start && position < end)
      score = scale * dot(q, head_dim, [&](int d) { return key_tile[lane * kMaxHeadDim + d]; });
    softmax.add_tile(sg, score, 0, head_dim, [&](int, int j, int column) { return value_tile[j * kMaxHeadDim + column]; });
  }

  // Response segment: step t of this sequence lives in row beam_slots[sequence, t]; read straight from the
  // cache (these rows are this beam's alone, so there is nothing to share through local memory). Under a
  // window it may be a ring of response_cells columns: step t, and its slot, in column t % response_cells.
  const int* slots = beam_slots + sequence * beam_slots_stride;
  const int64_t response_at = kv * response_head_stride;
  const int64_t response_scale_at = kv * response_scale_head_stride;
  auto cell = [&](int slot, int t) { return response_at + slot * response_row_stride + t * response_position_stride; };
  auto scale_of = [&](const bf16* scales, int slot, int t) {
    return Format ? (float)scales[response_scale_at + slot * response_scale_row_stride + t * response_scale_position_stride] : 0.0f;
  };
  // This split's share of the steps in the window: [steps_begin, steps_end).
  const int steps_first = sycl::max(window_first - prompt_len, 0);
  const int per_split = (response_len - steps_first + splits - 1) / splits;
  const int steps_begin = steps_first + split * per_split;
  const int steps_end = active ? sycl::min(steps_begin + per_split, response_len) : steps_begin;
  for (int first = steps_begin; first < steps_end; first += kKeyTile) {
    const int t = (first + lane) % response_cells;  // (the lane's step past steps_end reads nothing)
    const int slot = first + lane < steps_end ? slots[t] : 0;
    float score = kMinusInfinity;
    if (first + lane < steps_end) {
      const float k_scale = scale_of(response_k_scale, slot, t);
      score = scale * dot(q, head_dim, [&](int d) { return C::load(response_k + cell(slot, t) + d, k_scale); });
    }
    softmax.add_tile(sg, score, slot, head_dim, [&](int slot_j, int j, int column) {
      const int t_j = (first + j) % response_cells;
      return C::load(response_v + cell(slot_j, t_j) + column, scale_of(response_v_scale, slot_j, t_j));
    });
  }
  if (!active) return;
  if (splits == 1) {
    softmax.store(out + sequence * out_stride + h * head_dim, head_dim, lane);
  } else {  // partials of this split, rows indexed by (sequence, query head)
    const int64_t partial_row = split * rows_per_split + sequence * (kv_heads * group) + h;
    softmax.store_partial(partial_acc + partial_row * head_dim, partial_stats + partial_row * 2, head_dim, lane);
  }
}

// Work-group = one sub-group = one output row (sequence, query head): merges the splits' partials (each
// accumulator relative to its own split's max) into the normalised row; zeros where no key was attended.
template <typename T>
inline void combine_splits(T* out, const float* partial_acc, const float* partial_stats, int splits,
                           int64_t rows_per_split, int heads, int head_dim, int64_t out_stride) {
  const auto it = item();
  const int64_t row = it.get_group(0);
  const int lane = it.get_sub_group().get_local_linear_id();
  float top = kMinusInfinity;
  for (int s = 0; s < splits; ++s) top = sycl::fmax(top, partial_stats[(s * rows_per_split + row) * 2]);
  OnlineSoftmax merged;  // the splits' sums and accumulators, rescaled to `top`, then stored as one row's
  if (top != kMinusInfinity) {
    for (int s = 0; s < splits; ++s) {
      const int64_t partial = s * rows_per_split + row;
      const float weight = sycl::exp(partial_stats[partial * 2] - top);  // 0 for a split that saw no key
      if (weight == 0.0f) continue;  // its accumulator is zeros; skipped as masked keys are
      merged.sum += weight * partial_stats[partial * 2 + 1];
      for (int c = 0; c < kColumnsPerLane; ++c) {
        const int column = lane + c * kSubGroup;
        if (column < head_dim) merged.acc[c] += weight * partial_acc[partial * head_dim + column];
      }
    }
  }
  merged.store(out + (row / heads) * out_stride + (row % heads) * head_dim, head_dim, lane);
}

}  // namespace xc

// A work-group serves up to ROWS rows (beams x query heads per KV head), one sub-group each, and holds their
// query rows in local memory: 16 KiB for 32 rows. Each kernel comes in two sizes, so that a step of at
// most 4 rows (greedy, GQA groups up to 4) takes 10 KiB of local memory in all instead of 24: an Xe-core's
// 128 KiB then holds 12 of its work-groups instead of 5 (Intel's GPU occupancy calculator; not measured
// on a GPU).
#define XC_SEGMENT_ATTENTION_DECODE_KERNEL(NAME, T, FORMAT) \
  XC_SEGMENT_ATTENTION_DECODE_ROWS(NAME##_r4, T, FORMAT, 4) XC_SEGMENT_ATTENTION_DECODE_ROWS(NAME##_r32, T, FORMAT, 32)

#define XC_SEGMENT_ATTENTION_DECODE_ROWS(NAME, T, FORMAT, ROWS)                                                 \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void segment_attention_decode_##NAME(                          \
      T* out, const T* query, const xc::Cache<T, FORMAT>::Cell* prompt_k,                                     \
      const xc::Cache<T, FORMAT>::Cell* prompt_v, const xc::bf16* prompt_k_scale, const xc::bf16* prompt_v_scale, \
      const int* prompt_start, const xc::Cache<T, FORMAT>::Cell* response_k,                                  \
      const xc::Cache<T, FORMAT>::Cell* response_v, const xc::bf16* response_k_scale,                         \
      const xc::bf16* response_v_scale, const int* beam_slots, int beams, int kv_heads, int group,            \
      int row_chunks, int rows_per_chunk, int head_dim,                                                       \
      int prompt_len, int response_len, int response_cells, int window, float scale, int64_t query_stride,  \
      int64_t out_stride,                                                                                     \
      int64_t prompt_request_stride, int64_t prompt_head_stride, int64_t prompt_position_stride,             \
      int64_t prompt_scale_request_stride, int64_t prompt_scale_head_stride,                                \
      int64_t prompt_scale_position_stride, int64_t response_row_stride, int64_t response_head_stride,       \
      int64_t response_position_stride, int64_t response_scale_row_stride,                                  \
      int64_t response_scale_head_stride, int64_t response_scale_position_stride,                           \
      int64_t beam_slots_stride, const int* block_table, int64_t block_table_stride, int block_size,        \
      int splits, int64_t rows_per_split, float* partial_acc, float* partial_stats) {                                                                                \
    static xc::syclexp::work_group_static<T[xc::kKeyTile * xc::kMaxHeadDim]> key_tile;                         \
    static xc::syclexp::work_group_static<T[xc::kKeyTile * xc::kMaxHeadDim]> value_tile;                       \
    static xc::syclexp::work_group_static<float[ROWS * xc::kMaxHeadDim]> query_rows;                           \
    xc::segment_attention_decode<T, FORMAT>(                                                                   \
        out, query, prompt_k, prompt_v, prompt_k_scale, prompt_v_scale, prompt_start, response_k, response_v, \
        response_k_scale, response_v_scale, beam_slots, beams, kv_heads, group, row_chunks, rows_per_chunk,  \
        head_dim, prompt_len,                                                                                 \
        response_len, response_cells, window, scale, query_stride, out_stride, prompt_request_stride,          \
        prompt_head_stride,                                                                                   \
        prompt_position_stride, prompt_scale_request_stride, prompt_scale_head_stride,                        \
        prompt_scale_position_stride, response_row_stride, response_head_stride, response_position_stride,    \
        response_scale_row_stride, response_scale_head_stride, response_scale_position_stride,                \
        beam_slots_stride, block_table, block_table_stride, block_size, splits, rows_per_split, partial_acc,  \
        partial_stats, xc::local_array(key_tile),                                                            \
        xc::local_array(value_tile), xc::local_array(query_rows));                                             \
  }

#define XC_COMBINE_SPLITS_KERNEL(NAME, T)                                                                       \
  extern "C" XC_ND_RANGE_KERNEL XC_SUB_GROUP_16 void combine_splits_##NAME(                                    \
      T* out, const float* partial_acc, const float* partial_stats, int splits, int64_t rows_per_split,       \
      int heads, int head_dim, int64_t out_stride) {                                                           \
    xc::combine_splits<T>(out, partial_acc, partial_stats, splits, rows_per_split, heads, head_dim, out_stride); \
  }

XC_FOR_EACH_DTYPE_AND_FORMAT(XC_SEGMENT_ATTENTION_DECODE_KERNEL)
XC_FOR_EACH_DTYPE(XC_COMBINE_SPLITS_KERNEL)
