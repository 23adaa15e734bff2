/* Shared by the kernels: 8-lane float vectors (GCC vector extensions: AVX2 registers, or half
 * an AVX-512 one) and exp for softmax and SiLU arguments. */
#ifndef SHARDSERVE_VECMATH_H
#define SHARDSERVE_VECMATH_H

#include <math.h>
#include <stdint.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));  /* unaligned loads */
typedef int32_t v8i __attribute__((vector_size(32)));

static inline float hsum8(v8 s) {
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* exp(x) for x <= 0 on 8 lanes: Cephes' polynomial, relative error about 2e-7. Written on
 * vectors because GCC does not vectorize a scalar version (floorf, the bit cast); rounds to
 * nearest with the 1.5 * 2^23 trick. */
static inline v8 exp_neg8(v8 x) {
    const v8 lo = (v8){0} - 87.0f, magic = (v8){0} + 12582912.0f;
    const v8i below = x < lo;
    x = (v8)(((v8i)x & ~below) | ((v8i)lo & below));
    const v8 n = (x * 1.44269504f + magic) - magic;
    const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = (v8){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v8)((__builtin_convertvector(n, v8i) + 127) << 23);
}

/* One value (the tails of rows): lane 0 of the vector version, so there is one polynomial. */
static inline float exp_neg(float x) { return exp_neg8((v8){0} + x)[0]; }

#endif
