// A decoder layer's small ops on the CPU (docs/ops.md: rms_norm, fused_add_rms_norm, silu_and_mul,
// rotary_embedding_kv_write of a 16-bit cache): one call each instead of torch's 5-15 ops, which at a
// decode step's one row cost more in dispatch than in work. Each rounds where transformers' LLaMA does
// in the activation dtype (after each product of the rotation, the normalized row before its weight).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vectors.hpp"

namespace {

using namespace xc;

// Rows a norm or SiLU call splits across threads only past this many values: a decode step's one row
// would spend longer waking a thread than working.
constexpr int64_t PARALLEL_VALUES = 1 << 16;

// out = weight * round(x / rms(x)) for a row x held in float32 at `x` (hidden values).
template <typename T>
void normalize_row(const float* x, const T* weight, T* out, int64_t hidden, float eps) {
    floatv squares{};
    int64_t d = 0;
    for (; d + LANES <= hidden; d += LANES) {
        floatv v; std::memcpy(&v, x + d, sizeof v);
        squares += v * v;
    }
    float sum = lane_sum(squares);
    for (; d < hidden; ++d) sum += x[d] * x[d];
    const float inverse = 1.0f / std::sqrt(sum / float(hidden) + eps);
    d = 0;
    for (; d + LANES <= hidden; d += LANES) {
        floatv v; std::memcpy(&v, x + d, sizeof v);
        Element<T>::store(out + d, Element<T>::load(weight + d) * Element<T>::round(v * inverse));
    }
    for (; d < hidden; ++d) {
        T normalized; Element<T>::store(&normalized, x[d] * inverse);
        Element<T>::store(out + d, Element<T>::one(weight + d) * Element<T>::one(&normalized));
    }
}

template <typename T>
struct RmsNorm {
    static void run(void* out, int64_t out_stride, const void* input, int64_t input_stride, const void* weight,
                    int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for if (rows * hidden > PARALLEL_VALUES)
        for (int64_t r = 0; r < rows; ++r) {
            float x[hidden];
            const T* in = static_cast<const T*>(input) + r * input_stride;
            for (int64_t d = 0; d < hidden; ++d) x[d] = Element<T>::one(in + d);
            normalize_row(x, static_cast<const T*>(weight), static_cast<T*>(out) + r * out_stride, hidden, eps);
        }
    }
};

// residual += input (rounded), then input = weight * round(residual / rms(residual)).
template <typename T>
struct AddRmsNorm {
    static void run(void* input, int64_t input_stride, void* residual, int64_t residual_stride, const void* weight,
                    int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for if (rows * hidden > PARALLEL_VALUES)
        for (int64_t r = 0; r < rows; ++r) {
            float x[hidden];
            T* in = static_cast<T*>(input) + r * input_stride;
            T* res = static_cast<T*>(residual) + r * residual_stride;
            for (int64_t d = 0; d < hidden; ++d) {
                Element<T>::store(res + d, Element<T>::one(res + d) + Element<T>::one(in + d));
                x[d] = Element<T>::one(res + d);
            }
            normalize_row(x, static_cast<const T*>(weight), in, hidden, eps);
        }
    }
};

// out = round(silu(gate)) * up for each row's [gate | up] halves of `width` values each.
template <typename T>
struct SiluAndMul {
    static void run(void* out, int64_t out_stride, const void* input, int64_t input_stride, int64_t rows,
                    int64_t width) {
#pragma omp parallel for if (rows * width > PARALLEL_VALUES)
        for (int64_t r = 0; r < rows; ++r) {
            const T* gate = static_cast<const T*>(input) + r * input_stride;
            const T* up = gate + width;
            T* o = static_cast<T*>(out) + r * out_stride;
            int64_t d = 0;
            for (; d + LANES <= width; d += LANES) {
                const floatv g = Element<T>::load(gate + d);
                const floatv silu = Element<T>::round(g / (1.0f + exp_lanes(-g)));
                Element<T>::store(o + d, silu * Element<T>::load(up + d));
            }
            for (; d < width; ++d) {
                const float g = Element<T>::one(gate + d);
                T silu; Element<T>::store(&silu, g / (1.0f + std::exp(-g)));
                Element<T>::store(o + d, Element<T>::one(&silu) * Element<T>::one(up + d));
            }
        }
    }
};

// Rotates `heads` heads of x (rotate-half layout) in place by a token's cos and sin halves, rounding each
// product and sum to T as transformers does: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
template <typename T>
void rotate_heads(T* x, int64_t head_stride, int64_t heads, const T* cos_sin, int64_t dim) {
    const int64_t half = dim / 2;
    const T* cos = cos_sin;
    const T* sin = cos_sin + half;
    for (int64_t h = 0; h < heads; ++h) {
        T* x1 = x + h * head_stride;
        T* x2 = x1 + half;
        int64_t d = 0;
        for (; d + LANES <= half; d += LANES) {
            const floatv a = Element<T>::load(x1 + d), b = Element<T>::load(x2 + d);
            const floatv c = Element<T>::load(cos + d), s = Element<T>::load(sin + d);
            const floatv first = Element<T>::round(a * c) - Element<T>::round(b * s);
            const floatv second = Element<T>::round(b * c) + Element<T>::round(a * s);
            Element<T>::store(x1 + d, first);
            Element<T>::store(x2 + d, second);
        }
        for (; d < half; ++d) {
            const float a = Element<T>::one(x1 + d), b = Element<T>::one(x2 + d);
            const float c = Element<T>::one(cos + d), s = Element<T>::one(sin + d);
            T ac, bs, bc, as;
            Element<T>::store(&ac, a * c); Element<T>::store(&bs, b * s);
            Element<T>::store(&bc, b * c); Element<T>::store(&as, a * s);
            Element<T>::store(x1 + d, Element<T>::one(&ac) - Element<T>::one(&bs));
            Element<T>::store(x2 + d, Element<T>::one(&bc) + Element<T>::one(&as));
        }
    }
}

struct TokenLayout {  // element strides of [T, heads, D] activations, D contiguous
    int64_t token, head;
};

struct CacheLayout {  // element strides of a [rows, Hkv, positions, D] cache, D contiguous
    int64_t row, head, position;
};

template <typename T>
struct RotaryKVWrite {
    static void run(void* query, TokenLayout ql, void* key, TokenLayout kl, const void* value, TokenLayout vl,
                    const void* cos_sin, int64_t cos_sin_stride, void* k_cache, void* v_cache, CacheLayout cl,
                    const int64_t* cache_rows, const int64_t* cache_positions, int64_t tokens, int64_t heads,
                    int64_t kv_heads, int64_t dim) {
        for (int64_t t = 0; t < tokens; ++t) {
            T* k = static_cast<T*>(key) + t * kl.token;
            if (cos_sin != nullptr) {
                const T* rotation = static_cast<const T*>(cos_sin) + t * cos_sin_stride;
                rotate_heads(static_cast<T*>(query) + t * ql.token, ql.head, heads, rotation, dim);
                rotate_heads(k, kl.head, kv_heads, rotation, dim);
            }
            const T* v = static_cast<const T*>(value) + t * vl.token;
            const int64_t cell = cache_rows[t] * cl.row + cache_positions[t] * cl.position;
            for (int64_t h = 0; h < kv_heads; ++h) {
                std::memcpy(static_cast<T*>(k_cache) + cell + h * cl.head, k + h * kl.head, dim * sizeof(T));
                std::memcpy(static_cast<T*>(v_cache) + cell + h * cl.head, v + h * vl.head, dim * sizeof(T));
            }
        }
    }
};

}  // namespace

extern "C" {

// Each returns 0, or -1 for an unknown dtype code (0 bfloat16, 1 float16, 2 float32). Rows are `stride`
// elements apart, their values contiguous.

int xc_rms_norm(int dtype, void* out, int64_t out_stride, const void* input, int64_t input_stride,
                const void* weight, int64_t rows, int64_t hidden, float eps) {
    return by_dtype<RmsNorm>(dtype, out, out_stride, input, input_stride, weight, rows, hidden, eps) ? 0 : -1;
}

int xc_fused_add_rms_norm(int dtype, void* input, int64_t input_stride, void* residual, int64_t residual_stride,
                          const void* weight, int64_t rows, int64_t hidden, float eps) {
    return by_dtype<AddRmsNorm>(dtype, input, input_stride, residual, residual_stride, weight, rows, hidden, eps)
               ? 0 : -1;
}

int xc_silu_and_mul(int dtype, void* out, int64_t out_stride, const void* input, int64_t input_stride,
                    int64_t rows, int64_t width) {
    return by_dtype<SiluAndMul>(dtype, out, out_stride, input, input_stride, rows, width) ? 0 : -1;
}

// Rotates query [T, heads, D] and key [T, Hkv, D] in place (cos_sin [T, D]: each token's [cos | sin];
// NULL: no rotation, query unused) and writes key and value into the caches' cells (cache_rows[t], :,
// cache_positions[t]), caches of the activation dtype.
int xc_rotary_kv_write(int dtype, void* query, int64_t q_token, int64_t q_head, void* key, int64_t k_token,
                       int64_t k_head, const void* value, int64_t v_token, int64_t v_head, const void* cos_sin,
                       int64_t cos_sin_stride, void* k_cache, void* v_cache, int64_t cache_row, int64_t cache_head,
                       int64_t cache_position, const int64_t* cache_rows, const int64_t* cache_positions,
                       int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim) {
    return by_dtype<RotaryKVWrite>(dtype, query, TokenLayout{q_token, q_head}, key, TokenLayout{k_token, k_head}, value,
                                   TokenLayout{v_token, v_head}, cos_sin, cos_sin_stride, k_cache, v_cache,
                                   CacheLayout{cache_row, cache_head, cache_position}, cache_rows, cache_positions,
                                   tokens, heads, kv_heads, dim)
               ? 0 : -1;
}

}  // extern "C"
