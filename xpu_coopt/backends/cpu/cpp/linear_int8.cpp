// 8-bit weights with a float32 scale per group of columns (GGUF Q8_0's 32, Q6_K's 16, one a row) times a
// few rows of 16-bit or float32 activations, on the CPU: out = x @ (codes * scales).T, as a decode step
// needs it (docs/ops.md, "linear_int8"). Each weight byte is read once for all rows: the codes widen to
// float32 in registers, each group's products are summed, then weighed by the group's scale (a float32
// sum of q x, times d: the format's own q * d weights up to float32 rounding). Output features split
// across OpenMP threads.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vectors.hpp"

namespace {

using namespace xc;

// 16 codes widened to float32 (GCC scalarizes an int8 vector's conversion: the x86 widening by hand).
inline floatv load_codes(const int8_t* p) {
#if defined(__AVX512F__)
    const __m512 wide = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    floatv v; std::memcpy(&v, &wide, sizeof v); return v;
#elif defined(__AVX2__)
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
    floatv v; std::memcpy(&v, &low, sizeof low); std::memcpy(reinterpret_cast<char*>(&v) + sizeof low, &high, sizeof high);
    return v;
#else
    floatv v;
    for (int i = 0; i < LANES; ++i) v[i] = float(p[i]);
    return v;
#endif
}

// Output features a thread takes at a time.
constexpr int64_t FEATURE_BLOCK = 16;

template <int TILE>
void features(const float* x, int64_t k_dim, const int8_t* codes, const float* scales, int64_t group,
              int64_t first, int64_t end, float* out, int64_t out_stride) {
    const int64_t groups = k_dim / group;
    for (int64_t n = first; n < end; ++n) {
        const int8_t* row = codes + n * k_dim;
        const float* row_scales = scales + n * groups;
        floatv acc[TILE] = {};
        for (int64_t g = 0; g < groups; ++g) {
            floatv partial[TILE] = {};
            for (int64_t k = g * group; k < (g + 1) * group; k += LANES) {
                const floatv w = load_codes(row + k);
#pragma GCC unroll 4
                for (int r = 0; r < TILE; ++r) {
                    floatv v; std::memcpy(&v, x + r * k_dim + k, sizeof v);
                    partial[r] += w * v;
                }
            }
            const float scale = row_scales[g];
#pragma GCC unroll 4
            for (int r = 0; r < TILE; ++r) acc[r] += partial[r] * scale;
        }
#pragma GCC unroll 4
        for (int r = 0; r < TILE; ++r) out[r * out_stride + n] = lane_sum(acc[r]);
    }
}

template <int TILE>
struct Features {  // features<TILE> for the rows from `r` on
    static void run(int64_t r, const float* x, int64_t k_dim, const int8_t* codes, const float* scales, int64_t group,
                    int64_t first, int64_t end, float* sums, int64_t n_dim) {
        features<TILE>(x + r * k_dim, k_dim, codes, scales, group, first, end, sums + r * n_dim, n_dim);
    }
};

template <typename T>
struct LinearInt8 {
    static void run(const void* input, int64_t input_stride, int64_t rows, int64_t k_dim, const int8_t* codes,
                    const float* scales, int64_t group, int64_t n_dim, const void* bias, void* output,
                    int64_t output_stride) {
        std::vector<float> x(rows * k_dim), sums(rows * n_dim);
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < k_dim; ++k) x[r * k_dim + k] = Element<T>::one(static_cast<const T*>(input) + r * input_stride + k);
        const int64_t blocks = (n_dim + FEATURE_BLOCK - 1) / FEATURE_BLOCK;
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t first = b * FEATURE_BLOCK, end = std::min(n_dim, first + FEATURE_BLOCK);
            by_row_tiles<Features>(rows, static_cast<const float*>(x.data()), k_dim, codes, scales, group, first, end,
                                   sums.data(), n_dim);
        }
        const T* b = static_cast<const T*>(bias);
        for (int64_t r = 0; r < rows; ++r) {
            T* o = static_cast<T*>(output) + r * output_stride;
            for (int64_t n = 0; n < n_dim; ++n) {
                float value = sums[r * n_dim + n];
                if (b != nullptr) {  // the product rounded first, then the bias added: as F.linear's addmm
                    T product; Element<T>::store(&product, value);
                    value = Element<T>::one(&product) + Element<T>::one(b + n);
                }
                Element<T>::store(o + n, value);
            }
        }
    }
};

}  // namespace

extern "C" {

// output [rows, N] (rows output_stride apart) = input [rows, K] (rows input_stride apart) @ W.T (+ bias [N]),
// W = codes (int8 [N, K], contiguous) * scales (float32 [N, K / group], contiguous), group a multiple of 16
// dividing K. Returns 0, or -1 for an unknown dtype code or a group that is not a multiple of 16.
int xc_linear_int8(int dtype, const void* input, int64_t input_stride, int64_t rows, int64_t k_dim,
                   const int8_t* codes, const float* scales, int64_t group, int64_t n_dim, const void* bias,
                   void* output, int64_t output_stride) {
    if (group % LANES != 0 || k_dim % group != 0) return -1;
    return by_dtype<LinearInt8>(dtype, input, input_stride, rows, k_dim, codes, scales, group, n_dim, bias, output,
                                output_stride)
               ? 0 : -1;
}

}  // extern "C"
