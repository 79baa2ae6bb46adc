// Vectors of 16 float32 lanes (GCC/Clang vector extensions: AVX-512, AVX2 or SSE code by -march) and
// the activation dtypes' loads and stores, shared by the CPU backend's native kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace xc {

constexpr int LANES = 16;
typedef float floatv __attribute__((vector_size(LANES * sizeof(float))));
typedef uint16_t halfv __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef uint32_t wordv __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef int32_t intv __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef _Float16 fp16v __attribute__((vector_size(LANES * sizeof(_Float16))));

enum Dtype : int { BFLOAT16 = 0, FLOAT16 = 1, FLOAT32 = 2 };

template <typename T> struct Element;
template <> struct Element<uint16_t> {  // bfloat16: the high half of a float32
    static floatv load(const uint16_t* p) {
        halfv h; std::memcpy(&h, p, sizeof h);
        wordv w = __builtin_convertvector(h, wordv) << 16;
        floatv f; std::memcpy(&f, &w, sizeof f); return f;
    }
    static float one(const uint16_t* p) { uint32_t w = uint32_t(*p) << 16; float f; std::memcpy(&f, &w, 4); return f; }
    static void store(uint16_t* p, float f) {  // round to nearest even, NaN kept NaN
        uint32_t w; std::memcpy(&w, &f, 4);
        *p = (w & 0x7fffffffu) > 0x7f800000u ? uint16_t((w >> 16) | 0x40) : uint16_t((w + 0x7fffu + ((w >> 16) & 1)) >> 16);
    }
    static wordv rounded_bits(floatv f) {  // each lane rounded to bfloat16, in the high half
        wordv w; std::memcpy(&w, &f, sizeof w);
        wordv nearest = (w + 0x7fffu + ((w >> 16) & 1u)) & 0xffff0000u;
        return (w & 0x7fffffffu) > 0x7f800000u ? (w | 0x400000u) & 0xffff0000u : nearest;
    }
    static void store(uint16_t* p, floatv f) {
        halfv h = __builtin_convertvector(rounded_bits(f) >> 16, halfv);
        std::memcpy(p, &h, sizeof h);
    }
    static floatv round(floatv f) {  // f rounded to bfloat16, as float32
        wordv w = rounded_bits(f);
        floatv r; std::memcpy(&r, &w, sizeof r); return r;
    }
};
template <> struct Element<_Float16> {
    static floatv load(const _Float16* p) { fp16v h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, floatv); }
    static float one(const _Float16* p) { return float(*p); }
    static void store(_Float16* p, float f) { *p = _Float16(f); }
    static void store(_Float16* p, floatv f) { fp16v h = __builtin_convertvector(f, fp16v); std::memcpy(p, &h, sizeof h); }
    static floatv round(floatv f) { return __builtin_convertvector(__builtin_convertvector(f, fp16v), floatv); }
};
template <> struct Element<float> {
    static floatv load(const float* p) { floatv f; std::memcpy(&f, p, sizeof f); return f; }
    static float one(const float* p) { return *p; }
    static void store(float* p, float f) { *p = f; }
    static void store(float* p, floatv f) { std::memcpy(p, &f, sizeof f); }
    static floatv round(floatv f) { return f; }
};

typedef float float8 __attribute__((vector_size(8 * sizeof(float))));
typedef float float4 __attribute__((vector_size(4 * sizeof(float))));

// The sum of a vector's lanes, halves added in a tree (a serial sum of 16 lanes was half a step's time).
inline float lane_sum(floatv v) {
    float8 eight = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    float4 four = __builtin_shufflevector(eight, eight, 0, 1, 2, 3) + __builtin_shufflevector(eight, eight, 4, 5, 6, 7);
    return (four[0] + four[2]) + (four[1] + four[3]);
}

// exp(x) as 2^n 2^f with a degree-6 polynomial for 2^f on f in [-0.5, 0.5]: relative error under 2e-7;
// 0 below -87 and infinity above 88.7, as float32's own.
inline floatv exp_lanes(floatv x) {
    floatv t = x * 1.44269504088896341f;
    t = t < -126.0f ? floatv{} - 126.0f : t;
    t = t > 127.0f ? floatv{} + 127.0f : t;
    floatv n = __builtin_convertvector(__builtin_convertvector(t + (t < 0 ? -0.5f : 0.5f), intv), floatv);
    floatv f = (t - n) * 0.69314718055994531f;  // 2^(t-n) = e^f
    floatv p = floatv{} + 1.0f / 720;
    p = p * f + 1.0f / 120; p = p * f + 1.0f / 24; p = p * f + 1.0f / 6; p = p * f + 0.5f; p = p * f + 1.0f; p = p * f + 1.0f;
    intv bits = (__builtin_convertvector(n, intv) + 127) << 23;
    floatv scale; std::memcpy(&scale, &bits, sizeof scale);
    floatv result = p * scale;
    result = x < -87.0f ? floatv{} : result;
    return x > 88.7f ? floatv{} + INFINITY : result;
}

// Rows of activations a kernel takes at a time: their float32 sums stay in registers.
constexpr int ROW_TILE = 4;

// Runs F<TILE>::run(first row, args...) over `rows` in tiles of ROW_TILE rows, the last tile smaller.
template <template <int> class F, typename... Args>
void by_row_tiles(int64_t rows, Args... args) {
    int64_t r = 0;
    for (; r + ROW_TILE <= rows; r += ROW_TILE) F<ROW_TILE>::run(r, args...);
    switch (rows - r) {
        case 3: F<3>::run(r, args...); break;
        case 2: F<2>::run(r, args...); break;
        case 1: F<1>::run(r, args...); break;
    }
}

// Calls F<T>::run(args...) for the activation dtype `dtype` names; false for an unknown one.
template <template <typename> class F, typename... Args>
bool by_dtype(int dtype, Args... args) {
    switch (dtype) {
        case BFLOAT16: F<uint16_t>::run(args...); return true;
        case FLOAT16: F<_Float16>::run(args...); return true;
        case FLOAT32: F<float>::run(args...); return true;
    }
    return false;
}

}  // namespace xc
