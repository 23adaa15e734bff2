/* The elementwise steps between a decoder layer's matmuls, float32, for CPUs, each one pass over
 * its rows split across threads: in PyTorch each is several operators, each a pass over memory
 * and a dispatch (RMSNorm is five, rotary ten).
 *
 *   add_rms_norm: sum = x + residual (or x), out = sum * rsqrt(mean(sum^2) + eps) * weight
 *   silu_mul:     out[n][i] = silu(gu[n][i]) * gu[n][I + i]   (gate and up side by side)
 *   rotary:       q and k rotated in place by their positions, Hugging Face's rotate_half
 *                 layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the two halves
 *   write_kv:     the new keys and values into their cache slots, in the cache's dtype
 */
#include "vecmath.h"

/* x, residual (may be NULL), sum, out: (N, H) contiguous; weight (H,). Every function here
 * returns 0 (ctypes reads an int). */
int add_rms_norm(const float *x, const float *residual, const float *weight, float *sum,
                 float *out, int64_t N, int64_t H, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (N * H > 32768)
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * H;
        float *sn = sum + n * H, *on = out + n * H;
        float ss = 0.0f;
        if (residual) {
            const float *rn = residual + n * H;
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < H; i++) {
                sn[i] = xn[i] + rn[i];
                ss += sn[i] * sn[i];
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < H; i++) {
                sn[i] = xn[i];
                ss += xn[i] * xn[i];
            }
        }
        const float scale = 1.0f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t i = 0; i < H; i++) on[i] = sn[i] * scale * weight[i];
    }
    return 0;
}

/* silu(g) = g / (1 + exp(-g)), from e = exp(-|g|) only: g / (1 + e) for g >= 0, g e / (1 + e)
 * below, so exp never overflows. */
static inline float silu(float g) {
    const float e = exp_neg(-fabsf(g));
    return g * (g >= 0.0f ? 1.0f : e) / (1.0f + e);
}

/* gu (N, 2 I) contiguous, gate and up side by side; out (N, I). */
int silu_mul(const float *gu, float *out, int64_t N, int64_t I, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (N * I > 32768)
    for (int64_t n = 0; n < N; n++) {
        const float *g = gu + n * 2 * I, *u = g + I;
        float *o = out + n * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8)
            *(v8 *)(o + i) = silu_mul8(*(const v8 *)(g + i), *(const v8 *)(u + i));
        for (; i < I; i++) o[i] = silu(g[i]) * u[i];
    }
    return 0;
}

/* q (N, nh, hd) and k (N, nkv, hd) with row strides q_stride and k_stride (floats between two
 * tokens; a token's heads contiguous), cos and sin (P, hd) tables, positions (N,). */
int rotary(float *q, float *k, const float *cos_t, const float *sin_t,
           const int64_t *positions, int64_t N, int nh, int nkv, int hd, int64_t q_stride,
           int64_t k_stride, int num_threads) {
    const int half = hd / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (N > 64)
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos_t + positions[n] * hd, *s = sin_t + positions[n] * hd;
        for (int h = 0; h < nh + nkv; h++) {
            float *x = h < nh ? q + n * q_stride + (int64_t)h * hd
                              : k + n * k_stride + (int64_t)(h - nh) * hd;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] - x2 * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
    return 0;
}

/* A float32 value as bfloat16, rounded to nearest even (as PyTorch converts); NaN stays NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* ... and as float16 (F16C's conversion where the CPU has it: GCC before 12 has no _Float16). */
static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    const _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
#endif
}

/* The new tokens' keys and values into their cache slots: k and v (N, width) rows at strides
 * k_stride / v_stride (floats; the QKV output's views), slots (N,) (block * block_size +
 * offset), caches (slots, width) of type kvtype (W_F32, W_BF16 or W_F16: rounded to nearest
 * even). One pass, where index_copy_ after a conversion is two and slow on 16-bit tensors. */
int write_kv(const float *k, const float *v, void *k_cache, void *v_cache,
             const int64_t *slots, int64_t N, int64_t width, int64_t k_stride,
             int64_t v_stride, int kvtype, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (N * width > 65536)
    for (int64_t n = 0; n < N; n++)
        for (int side = 0; side < 2; side++) {
            const float *src = side ? v + n * v_stride : k + n * k_stride;
            void *cache = side ? v_cache : k_cache;
            const int64_t at = slots[n] * width;
            if (kvtype == W_F32) {
                memcpy((float *)cache + at, src, (size_t)width * 4);
            } else if (kvtype == W_BF16) {
                uint16_t *dst = (uint16_t *)cache + at;
                for (int64_t i = 0; i < width; i++) dst[i] = f32_to_bf16(src[i]);
            } else {
                uint16_t *dst = (uint16_t *)cache + at;
                for (int64_t i = 0; i < width; i++) dst[i] = f32_to_f16(src[i]);
            }
        }
    return 0;
}
