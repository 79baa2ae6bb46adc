// Attention of a few query rows over many keys, on the CPU: a decode step's, where each KV head's query
// rows (its query heads, times beams) attend over the cached K/V columns. Built once with g++ by
// xpu_coopt/backends/cpu/native.py and called through ctypes on torch CPU tensors' memory.
//
// One pass over K and one over V, each column's 16-bit values widened to float32 once for all rows; the
// columns split in blocks across OpenMP threads (torch's own runtime: the library is loaded after torch),
// each block's partial softmax merged by its maximum and sum as flash attention merges its splits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vectors.hpp"

namespace {

using namespace xc;

// Columns a task attends: enough to amortize its merge, few enough that a step's tasks fill the threads.
constexpr int64_t BLOCK_COLUMNS = 256;

struct Layout {  // element strides of a [B, H, rows or columns, D] operand, D contiguous
    int64_t batch, head, row;
};

// Query rows go ROW_TILE at a time (vectors.hpp): their accumulators stay in registers (a row's in memory
// made each column wait on the previous column's store).
// Up to 4 vectors (64 values of head_dim) of a value row at a time, for the same reason.
constexpr int DIM_TILE = 4;

// scores[r, c] = q_r . k_c for `tile` rows from qf (float32, scaled) over `columns` keys from `key`.
template <typename T, int TILE>
void score_tile(const float* qf, const T* key, int64_t key_stride, int64_t columns, int64_t dim, float* scores,
                int64_t score_stride) {
    const int64_t full = dim / LANES * LANES;
    for (int64_t c = 0; c < columns; ++c, key += key_stride) {
        floatv acc[TILE] = {};
        for (int64_t d = 0; d < full; d += LANES) {
            const floatv k = Element<T>::load(key + d);
#pragma GCC unroll 4
            for (int r = 0; r < TILE; ++r) {
                floatv q; std::memcpy(&q, qf + r * dim + d, sizeof q);
                acc[r] += q * k;
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < TILE; ++r) {
            float s = lane_sum(acc[r]);
            for (int64_t d = full; d < dim; ++d) s += qf[r * dim + d] * Element<T>::one(key + d);
            scores[r * score_stride + c] = s;
        }
    }
}

// out[r, d0 : d0 + 16 VECTORS] += sum_c p[r, c] v_c for `tile` rows.
template <typename T, int TILE, int VECTORS>
void value_tile(const float* p, int64_t p_stride, const T* value, int64_t value_stride, int64_t columns,
                float* out, int64_t out_stride) {
    floatv acc[TILE][VECTORS] = {};
    for (int64_t c = 0; c < columns; ++c, value += value_stride) {
        floatv v[VECTORS];
#pragma GCC unroll 4
        for (int j = 0; j < VECTORS; ++j) v[j] = Element<T>::load(value + j * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < TILE; ++r) {
            const float weight = p[r * p_stride + c];
#pragma GCC unroll 4
            for (int j = 0; j < VECTORS; ++j) acc[r][j] += weight * v[j];
        }
    }
    for (int r = 0; r < TILE; ++r)
        for (int j = 0; j < VECTORS; ++j) std::memcpy(out + r * out_stride + j * LANES, &acc[r][j], sizeof(floatv));
}

template <typename T, int TILE>
void value_rows(const float* p, int64_t p_stride, const T* value, int64_t value_stride, int64_t columns,
                int64_t dim, float* out) {
    int64_t d = 0;
    for (; d + DIM_TILE * LANES <= dim; d += DIM_TILE * LANES)
        value_tile<T, TILE, DIM_TILE>(p, p_stride, value + d, value_stride, columns, out + d, dim);
    switch ((dim - d) / LANES) {
        case 3: value_tile<T, TILE, 3>(p, p_stride, value + d, value_stride, columns, out + d, dim); d += 3 * LANES; break;
        case 2: value_tile<T, TILE, 2>(p, p_stride, value + d, value_stride, columns, out + d, dim); d += 2 * LANES; break;
        case 1: value_tile<T, TILE, 1>(p, p_stride, value + d, value_stride, columns, out + d, dim); d += LANES; break;
    }
    for (; d < dim; ++d)  // a head_dim not a multiple of 16: its last values one at a time
        for (int r = 0; r < TILE; ++r) {
            float sum = 0.0f;
            for (int64_t c = 0; c < columns; ++c) sum += p[r * p_stride + c] * Element<T>::one(value + c * value_stride + d);
            out[r * dim + d] = sum;
        }
}

template <typename T>
struct Tiles {
    template <int TILE>
    struct Scores {
        static void run(int64_t r, const float* qf, const T* key, int64_t key_stride, int64_t columns, int64_t dim,
                        float* scores) {
            score_tile<T, TILE>(qf + r * dim, key, key_stride, columns, dim, scores + r * columns, columns);
        }
    };
    template <int TILE>
    struct Values {
        static void run(int64_t r, const float* p, int64_t columns, const T* value, int64_t value_stride, int64_t dim,
                        float* out) {
            value_rows<T, TILE>(p + r * columns, columns, value, value_stride, columns, dim, out + r * dim);
        }
    };
};

// One task: `rows` queries of (batch b, head h) over columns [first, end): each row's maximum score,
// sum of exp(score - maximum) and the values weighed by those, unnormalized.
template <typename T>
void attend_block(const T* q, const T* k, const T* v, Layout ql, Layout kl, Layout vl, int64_t b, int64_t h,
                  int64_t rows, int64_t first, int64_t end, int64_t dim, float scale, float* max_out,
                  float* sum_out, float* acc_out, std::vector<float>& scratch) {
    const int64_t columns = end - first;
    scratch.resize(rows * dim + rows * columns);
    float* qf = scratch.data();  // the rows' queries in float32, scaled
    float* scores = qf + rows * dim;  // [rows, columns]
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < dim; ++d) qf[r * dim + d] = Element<T>::one(q + b * ql.batch + h * ql.head + r * ql.row + d) * scale;
    const T* key = k + b * kl.batch + h * kl.head + first * kl.row;
    by_row_tiles<Tiles<T>::template Scores>(rows, static_cast<const float*>(qf), key, kl.row, columns, dim, scores);
    for (int64_t r = 0; r < rows; ++r) {
        float* row = scores + r * columns;
        float m = -INFINITY;
        for (int64_t c = 0; c < columns; ++c) m = std::max(m, row[c]);
        float sum = 0.0f;
        int64_t c = 0;
        for (; c + LANES <= columns; c += LANES) {
            floatv x; std::memcpy(&x, row + c, sizeof x);
            x = exp_lanes(x - m);
            std::memcpy(row + c, &x, sizeof x);
            sum += lane_sum(x);
        }
        for (; c < columns; ++c) { row[c] = std::exp(row[c] - m); sum += row[c]; }
        max_out[r] = m;
        sum_out[r] = sum;
    }
    const T* value = v + b * vl.batch + h * vl.head + first * vl.row;
    by_row_tiles<Tiles<T>::template Values>(rows, static_cast<const float*>(scores), columns, value, vl.row, dim, acc_out);
}

template <typename T>
void attend(const T* q, Layout ql, const T* k, Layout kl, const T* v, Layout vl, T* out, float* lse,
            const int64_t* first_column, int64_t batch, int64_t heads, int64_t rows, int64_t columns,
            int64_t dim, float scale) {
    const int64_t blocks = std::max<int64_t>(1, (columns + BLOCK_COLUMNS - 1) / BLOCK_COLUMNS);
    const int64_t tasks = batch * heads * blocks;
    std::vector<float> block_max(tasks * rows, -INFINITY), block_sum(tasks * rows, 0.0f), block_acc(tasks * rows * dim, 0.0f);
#pragma omp parallel
    {
        std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t pair = t / blocks, block = t % blocks, b = pair / heads, h = pair % heads;
            const int64_t start = first_column ? std::max<int64_t>(first_column[b], 0) : 0;
            const int64_t first = std::max(start, block * BLOCK_COLUMNS), end = std::min(columns, (block + 1) * BLOCK_COLUMNS);
            if (first >= end) continue;  // padding only: its maximum stays -inf and weighs nothing
            attend_block<T>(q, k, v, ql, kl, vl, b, h, rows, first, end, dim, scale, &block_max[t * rows],
                            &block_sum[t * rows], &block_acc[t * rows * dim], scratch);
        }
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < batch * heads; ++pair) {
            std::vector<float> merged(dim);
            for (int64_t r = 0; r < rows; ++r) {
                float m = -INFINITY;
                for (int64_t block = 0; block < blocks; ++block) m = std::max(m, block_max[(pair * blocks + block) * rows + r]);
                T* o = out + (pair * rows + r) * dim;
                if (m == -INFINITY) {  // no column to attend (all padding): zeros, and a log-sum-exp of -inf
                    for (int64_t d = 0; d < dim; ++d) Element<T>::store(o + d, 0.0f);
                    lse[pair * rows + r] = -INFINITY;
                    continue;
                }
                std::fill(merged.begin(), merged.end(), 0.0f);
                float sum = 0.0f;
                for (int64_t block = 0; block < blocks; ++block) {
                    const int64_t t = pair * blocks + block;
                    if (block_max[t * rows + r] == -INFINITY) continue;
                    const float weight = std::exp(block_max[t * rows + r] - m);
                    sum += weight * block_sum[t * rows + r];
                    const float* acc = &block_acc[(t * rows + r) * dim];
                    for (int64_t d = 0; d < dim; ++d) merged[d] += weight * acc[d];
                }
                for (int64_t d = 0; d < dim; ++d) Element<T>::store(o + d, merged[d] / sum);
                lse[pair * rows + r] = m + std::log(sum);
            }
        }
    }
}

template <typename T>
struct AttendRows {  // attend() on the untyped pointers of the C entry
    static void run(const void* q, Layout ql, const void* k, Layout kl, const void* v, Layout vl, void* out,
                    float* lse, const int64_t* first_column, int64_t batch, int64_t heads, int64_t rows,
                    int64_t columns, int64_t dim, float scale) {
        attend(static_cast<const T*>(q), ql, static_cast<const T*>(k), kl, static_cast<const T*>(v), vl,
               static_cast<T*>(out), lse, first_column, batch, heads, rows, columns, dim, scale);
    }
};

}  // namespace

extern "C" {

// out [B, H, rows, D] (contiguous) and lse [B, H, rows] (float32, contiguous) of the queries q
// [B, H, rows, D] over K and V [B, H, columns, D], scaled by `scale`. q, K and V take any element strides
// (batch, head, row or column) with D contiguous; batch b attends from column first_column[b] on (NULL:
// from 0). Returns 0, or -1 for an unknown dtype.
int xc_attend_rows(int dtype, const void* q, int64_t q_batch, int64_t q_head, int64_t q_row, const void* k,
                   int64_t k_batch, int64_t k_head, int64_t k_column, const void* v, int64_t v_batch,
                   int64_t v_head, int64_t v_column, void* out, float* lse, const int64_t* first_column,
                   int64_t batch, int64_t heads, int64_t rows, int64_t columns, int64_t dim, float scale) {
    const Layout ql{q_batch, q_head, q_row}, kl{k_batch, k_head, k_column}, vl{v_batch, v_head, v_column};
    return by_dtype<AttendRows>(dtype, q, ql, k, kl, v, vl, out, lse, first_column, batch, heads, rows, columns, dim,
                                scale)
               ? 0 : -1;
}

}  // extern "C"
