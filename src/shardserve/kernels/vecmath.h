/* Shared by the kernels: 8-lane float vectors (GCC vector extensions: AVX2 registers, or half
 * an AVX-512 one) and the widest the build has, 16-bit weights read as float32, and exp for
 * softmax and SiLU arguments. */
#ifndef SHARDSERVE_VECMATH_H
#define SHARDSERVE_VECMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4)));  /* unaligned loads */
typedef int32_t v8i __attribute__((vector_size(32)));

/* The widest float vector this build has: LANES floats (an AVX-512 register, or AVX2's). */
#if defined(__AVX512F__)
typedef float vec __attribute__((vector_size(64), aligned(4)));
typedef int32_t veci __attribute__((vector_size(64)));
#define LANES 16
#else
typedef float vec __attribute__((vector_size(32), aligned(4)));
typedef int32_t veci __attribute__((vector_size(32)));
#define LANES 8
#endif

static inline float hsum8(v8 s) {
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* Weight types a linear kernel takes: float32, or 16 bits per weight read into float32
 * registers (bfloat16 is the high half of a float32; float16 converts with F16C). Half the
 * bytes of float32 for the same float32 arithmetic: a memory-bound pass over the weights
 * takes about half the time. int8 (the packed GEMM only): a quarter of the bytes, integers
 * -127..127 read into float32 registers, times one float32 scale per output feature. */
enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_I8 = 3 };

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#endif
}

/* 8 consecutive 16-bit weights as floats. */
static inline v8 bf16x8(const uint16_t *p) {
#if defined(__AVX2__)
    return (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    v8 out;
    for (int i = 0; i < 8; i++) out[i] = bf16_to_f32(p[i]);
    return out;
#endif
}

static inline v8 f16x8(const uint16_t *p) {
#if defined(__F16C__) && defined(__AVX__)
    return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    v8 out;
    for (int i = 0; i < 8; i++) out[i] = f16_to_f32(p[i]);
    return out;
#endif
}

/* 8 consecutive values from element i of an array of weight type wtype (float32, bfloat16
 * or float16) as floats: the linear kernels' weights, the attention kernel's cache. */
static inline v8 load8(const void *p, int64_t i, int wtype) {
    if (wtype == W_BF16) return bf16x8((const uint16_t *)p + i);
    if (wtype == W_F16) return f16x8((const uint16_t *)p + i);
    return *(const v8 *)((const float *)p + i);
}

/* exp(x) for x <= 0 on the lanes of vector type V (integer lanes VI): Cephes' polynomial,
 * relative error about 2e-7. Written on vectors because GCC does not vectorize a scalar
 * version (floorf, the bit cast); rounds to nearest with the 1.5 * 2^23 trick. A macro, so a
 * kernel on AVX-512 registers defines a 16-lane one from the same polynomial. */
#define DEFINE_EXP_NEG(NAME, V, VI)                                           \
    static inline V NAME(V x) {                                               \
        const V lo = (V){0} - 87.0f, magic = (V){0} + 12582912.0f;            \
        const VI below = x < lo;                                              \
        x = (V)(((VI)x & ~below) | ((VI)lo & below));                         \
        const V n = (x * 1.44269504f + magic) - magic;                        \
        const V r = x - n * 0.693359375f + n * 2.12194440e-4f;                \
        V p = (V){0} + 1.9875691500e-4f;                                      \
        p = p * r + 1.3981999507e-3f;                                         \
        p = p * r + 8.3334519073e-3f;                                         \
        p = p * r + 4.1665795894e-2f;                                         \
        p = p * r + 1.6666665459e-1f;                                         \
        p = p * r + 5.0000001201e-1f;                                         \
        p = p * r * r + r + 1.0f;                                             \
        return p * (V)((__builtin_convertvector(n, VI) + 127) << 23);         \
    }
DEFINE_EXP_NEG(exp_neg8, v8, v8i)
DEFINE_EXP_NEG(exp_negv, vec, veci)

/* silu(g) * u, from e = exp(-|g|) only: g / (1 + e) for g >= 0, g e / (1 + e) below, so exp
 * never overflows. A macro for the same reason as DEFINE_EXP_NEG: elementwise.c's silu_mul
 * and bf16_gemm.c's fused activation compute it alike. */
#define DEFINE_SILU_MUL(NAME, V, VI, EXP)                                     \
    static inline V NAME(V g, V u) {                                          \
        const VI neg = g < 0;                                                 \
        const V e = EXP((V)((VI)g | ((VI){0} + (int32_t)0x80000000)));       \
        const V one = (V){0} + 1.0f;                                          \
        const V num = (V)(((VI)e & neg) | ((VI)one & ~neg));                  \
        return g * num / (one + e) * u;                                       \
    }
DEFINE_SILU_MUL(silu_mul8, v8, v8i, exp_neg8)
DEFINE_SILU_MUL(silu_mulv, vec, veci, exp_negv)

/* One value (the tails of rows): lane 0 of the vector version, so there is one polynomial. */
static inline float exp_neg(float x) { return exp_neg8((v8){0} + x)[0]; }

#endif
