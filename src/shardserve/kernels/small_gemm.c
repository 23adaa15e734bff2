/* y = x W^T (+ b) for a few rows of x, for CPUs: the decode-time matmul at small batch.
 *
 * With one to eight rows a linear layer is a pass over its weights, bound by memory bandwidth.
 * PyTorch's CPU GEMV reads the weights from one core's worth of bandwidth (measured here:
 * ~19 GB/s on 1 or 2 threads); this kernel splits the output features across OpenMP threads so
 * that every core streams its own slice of the weights, and reads each weight once for all rows.
 *
 *   x (N, K) float32, y (N, O) float32, w (O, K) (nn.Linear's layout) of weight type wtype
 *   (vecmath.h: float32, bfloat16 or float16; 16-bit weights are read into float32 registers,
 *   so the arithmetic is float32 whatever the weights), contiguous; bias (O,) float32 or NULL.
 * Weights packed at load time (gemm.c) take that kernel instead; this one serves the rest (a
 * head tied to its embedding, a shape gemm.c does not take).
 */
#include <omp.h>
#include <stdint.h>

#include "vecmath.h"

#define MAX_ROWS 8

static inline float load1(const void *w, int64_t i, int wtype) {
    if (wtype == W_BF16) return bf16_to_f32(((const uint16_t *)w)[i]);
    if (wtype == W_F16) return f16_to_f32(((const uint16_t *)w)[i]);
    return ((const float *)w)[i];
}

/* y[n][o] = dot(x[n], w[o]) for outputs [o0, o1). N and wtype are constants after inlining.
 * With few rows, U independent accumulators per row break the FMA latency chain (one chain
 * of 4-cycle FMAs would cap a core far below its memory bandwidth). */
#define UNROLL(N) ((N) == 1 ? 4 : (N) <= 3 ? 2 : 1)
static inline __attribute__((always_inline)) void dot_rows(
        const float *restrict x, const void *restrict w, float *restrict y, int N, int64_t K,
        int64_t O, int64_t o0, int64_t o1, int wtype) {
    const int U = UNROLL(N);
    for (int64_t o = o0; o < o1; o++) {
        const int64_t wo = o * K;
        v8 acc[MAX_ROWS][4];
        for (int n = 0; n < N; n++)
            for (int u = 0; u < U; u++) acc[n][u] = (v8){0};
        int64_t i = 0;
        for (; i + 8 * U <= K; i += 8 * U)
            for (int u = 0; u < U; u++) {
                const v8 wv = load8(w, wo + i + 8 * u, wtype);
                for (int n = 0; n < N; n++)
                    acc[n][u] += wv * *(const v8 *)(x + n * K + i + 8 * u);
            }
        for (; i + 8 <= K; i += 8) {
            const v8 wv = load8(w, wo + i, wtype);
            for (int n = 0; n < N; n++) acc[n][0] += wv * *(const v8 *)(x + n * K + i);
        }
        for (int n = 0; n < N; n++) {
            v8 a = acc[n][0];
            for (int u = 1; u < U; u++) a += acc[n][u];
            float s = hsum8(a);
            for (int64_t j = i; j < K; j++) s += load1(w, wo + j, wtype) * x[n * K + j];
            y[n * O + o] = s;
        }
    }
}

/* One weight type, every row count as its own constant (the accumulators stay in registers). */
#define SLICE(NAME, WTYPE)                                                                  \
    static void NAME(const float *x, const void *w, float *y, int N, int64_t K, int64_t O,  \
                     int64_t o0, int64_t o1) {                                              \
        switch (N) {                                                                        \
        case 1: dot_rows(x, w, y, 1, K, O, o0, o1, WTYPE); break;                           \
        case 2: dot_rows(x, w, y, 2, K, O, o0, o1, WTYPE); break;                           \
        case 3: dot_rows(x, w, y, 3, K, O, o0, o1, WTYPE); break;                           \
        case 4: dot_rows(x, w, y, 4, K, O, o0, o1, WTYPE); break;                           \
        case 5: dot_rows(x, w, y, 5, K, O, o0, o1, WTYPE); break;                           \
        case 6: dot_rows(x, w, y, 6, K, O, o0, o1, WTYPE); break;                           \
        case 7: dot_rows(x, w, y, 7, K, O, o0, o1, WTYPE); break;                           \
        default: dot_rows(x, w, y, 8, K, O, o0, o1, WTYPE); break;                          \
        }                                                                                   \
    }
SLICE(slice_f32, W_F32)
SLICE(slice_bf16, W_BF16)
SLICE(slice_f16, W_F16)

/* Returns 0, or -1 when N is outside 1..MAX_ROWS or wtype unknown (the caller uses its GEMM). */
int small_gemm(const float *x, const void *w, const float *bias, float *y, int N, int64_t K,
               int64_t O, int num_threads, int wtype) {
    if (N < 1 || N > MAX_ROWS || num_threads < 1 || wtype < W_F32 || wtype > W_F16) return -1;
    void (*slice)(const float *, const void *, float *, int, int64_t, int64_t, int64_t,
                  int64_t) = wtype == W_BF16 ? slice_bf16 : wtype == W_F16 ? slice_f16
                                                                             : slice_f32;
    /* Work items: runs of output features, several per thread so uneven cores even out. */
    const int64_t step = (O + 8 * num_threads - 1) / (8 * num_threads);
    const int64_t items = (O + step - 1) / step;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t it = 0; it < items; it++) {
        const int64_t o0 = it * step, o1 = o0 + step < O ? o0 + step : O;
        slice(x, w, y, N, K, O, o0, o1);
    }
    if (bias)
        for (int n = 0; n < N; n++)
            for (int64_t o = 0; o < O; o++) y[n * O + o] += bias[o];
    return 0;
}
