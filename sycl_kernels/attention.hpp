// Pieces shared by the attention kernels: one query row per sub-group, keys in tiles of 16 (one key per
// lane for q.k), and an online softmax whose output columns are spread over the lanes (lane l owns
// columns l, l + 16, ...). Scores, softmax and the weighted sum of values are float32.
#pragma once

#include "common.hpp"

namespace xc {

constexpr int kKeyTile = kSubGroup;
constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();

// q.k over head_dim: q a float row in local memory, k one key row (local tile or cache, via load).
template <typename Load>
inline float dot(const float* q, int head_dim, Load load) {
  float sum = 0.0f;
  for (int d = 0; d < head_dim; ++d) sum += q[d] * static_cast<float>(load(d));
  return sum;
}

struct OnlineSoftmax {
  float max = kMinusInfinity;
  float sum = 0.0f;
  float acc[kColumnsPerLane] = {};

  // Folds in one tile of keys: `score` is this lane's key's scaled score (-inf when masked), `key_ref` a
  // per-lane integer handed back to value(key_ref, j, column) for key j of the tile (a cache slot, say).
  template <typename Value>
  inline void add_tile(sycl::sub_group sg, float score, int key_ref, int head_dim, Value value) {
    const float tile_max = sycl::reduce_over_group(sg, score, sycl::maximum<float>());
    if (tile_max == kMinusInfinity) return;  // every key masked (uniform across the sub-group)
    const float new_max = sycl::fmax(max, tile_max);
    const float correction = sycl::exp(max - new_max);  // 0 on the first tile, where max is -inf
    const float p = sycl::exp(score - new_max);          // 0 for masked keys
    sum = sum * correction + sycl::reduce_over_group(sg, p, sycl::plus<float>());
    max = new_max;
    const int lane = sg.get_local_linear_id();
    for (int c = 0; c < kColumnsPerLane; ++c) acc[c] *= correction;
    for (int j = 0; j < kKeyTile; ++j) {
      const float pj = sycl::select_from_group(sg, p, j);
      const int ref = sycl::select_from_group(sg, key_ref, j);
      // Masked keys are skipped, not multiplied by 0: their cells may hold anything, NaN included.
      if (pj == 0.0f) continue;
      for (int c = 0; c < kColumnsPerLane; ++c) {
        const int column = lane + c * kSubGroup;
        if (column < head_dim) acc[c] += pj * static_cast<float>(value(ref, j, column));
      }
    }
  }

  // Writes this lane's columns of the normalised output row (zeros when no key was attended).
  template <typename T>
  inline void store(T* out, int head_dim, int lane) const {
    for (int c = 0; c < kColumnsPerLane; ++c) {
      const int column = lane + c * kSubGroup;
      if (column < head_dim) out[column] = static_cast<T>(sum > 0.0f ? acc[c] / sum : 0.0f);
    }
  }

  // Writes the row's partial state for a combine: this lane's columns of the unnormalised accumulator
  // (relative to `max`) to acc_out, and (max, sum) to stats (-inf and 0 when no key was attended).
  inline void store_partial(float* acc_out, float* stats, int head_dim, int lane) const {
    for (int c = 0; c < kColumnsPerLane; ++c) {
      const int column = lane + c * kSubGroup;
      if (column < head_dim) acc_out[column] = acc[c];
    }
    if (lane == 0) {
      stats[0] = max;
      stats[1] = sum;
    }
  }
};

}  // namespace xc
