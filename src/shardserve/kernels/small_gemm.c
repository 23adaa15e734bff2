/* y = x W^T (+ b) for a few rows of x, float32, for CPUs: the decode-time matmul at small batch.
 *
 * With one to eight rows a linear layer is a pass over its weights, bound by memory bandwidth.
 * PyTorch's CPU GEMV reads the weights from one core's worth of bandwidth (measured here:
 * ~19 GB/s on 1 or 2 threads); this kernel splits the output features across OpenMP threads so
 * that every core streams its own slice of the weights, and reads each weight once for all rows.
 *
 *   x (N, K), y (N, O), w (O, K) (nn.Linear's layout) contiguous; bias (O,) or NULL
 * Weights packed at load time (gemm.c) take that kernel instead; this one serves the rest (a
 * head tied to its embedding, a shape gemm.c does not take).
 */
#include <omp.h>
#include <stdint.h>

#include "vecmath.h"

#define MAX_ROWS 8

/* y[n][o] = dot(x[n], w[o]) for outputs [o0, o1). N is a constant after inlining. */
static inline __attribute__((always_inline)) void dot_rows(
        const float *restrict x, const float *restrict w, float *restrict y, int N, int64_t K,
        int64_t O, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++) {
        const float *wo = w + o * K;
        v8 acc[MAX_ROWS] = {{0}};
        int64_t i = 0;
        for (; i + 8 <= K; i += 8) {
            const v8 wv = *(const v8 *)(wo + i);
            for (int n = 0; n < N; n++) acc[n] += wv * *(const v8 *)(x + n * K + i);
        }
        for (int n = 0; n < N; n++) {
            float s = hsum8(acc[n]);
            for (int64_t j = i; j < K; j++) s += wo[j] * x[n * K + j];
            y[n * O + o] = s;
        }
    }
}

/* Returns 0, or -1 when N is outside 1..MAX_ROWS (the caller uses its GEMM). */
int small_gemm(const float *x, const float *w, const float *bias, float *y, int N, int64_t K,
               int64_t O, int num_threads) {
    if (N < 1 || N > MAX_ROWS || num_threads < 1) return -1;
    /* Work items: runs of output features, several per thread so uneven cores even out. */
    const int64_t step = (O + 8 * num_threads - 1) / (8 * num_threads);
    const int64_t items = (O + step - 1) / step;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t it = 0; it < items; it++) {
        const int64_t o0 = it * step, o1 = o0 + step < O ? o0 + step : O;
        switch (N) {  /* a constant row count keeps the accumulators in registers */
        case 1: dot_rows(x, w, y, 1, K, O, o0, o1); break;
        case 2: dot_rows(x, w, y, 2, K, O, o0, o1); break;
        case 3: dot_rows(x, w, y, 3, K, O, o0, o1); break;
        case 4: dot_rows(x, w, y, 4, K, O, o0, o1); break;
        case 5: dot_rows(x, w, y, 5, K, O, o0, o1); break;
        case 6: dot_rows(x, w, y, 6, K, O, o0, o1); break;
        case 7: dot_rows(x, w, y, 7, K, O, o0, o1); break;
        default: dot_rows(x, w, y, 8, K, O, o0, o1); break;
        }
    }
    if (bias)
        for (int n = 0; n < N; n++)
            for (int64_t o = 0; o < O; o++) y[n * O + o] += bias[o];
    return 0;
}
