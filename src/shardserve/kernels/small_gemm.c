/* y = x W^T (+ b) for a few rows of x, float32, for CPUs: the decode-time matmul at small batch.
 *
 * With one to eight rows a linear layer is a pass over its weights, bound by memory bandwidth.
 * PyTorch's CPU GEMV reads the weights from one core's worth of bandwidth (measured here:
 * ~19 GB/s on 1 or 2 threads); this kernel splits the output features across OpenMP threads so
 * that every core streams its own slice of the weights, and reads each weight once for all rows.
 *
 *   x (N, K), y (N, O) contiguous; bias (O,) or NULL
 *   w (O, K) when w_kn == 0 (nn.Linear's layout), or (K, O) when w_kn == 1 (a transposed head)
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8

typedef float v8 __attribute__((vector_size(32), aligned(4)));

static inline float hsum(v8 s) {
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* Rows of w are output features: y[n][o] = dot(x[n], w[o]). N is a constant after inlining. */
static inline __attribute__((always_inline)) void rows_ok(
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
            float s = hsum(acc[n]);
            for (int64_t j = i; j < K; j++) s += wo[j] * x[n * K + j];
            y[n * O + o] = s;
        }
    }
}

/* Rows of w are input features: part[n][:] = sum over i in [i0, i1) of x[n][i] w[i][:]. Each
 * thread streams a contiguous run of rows (a column split would read short strided pieces of
 * every row and miss the TLB on each); the partial sums are added up afterwards. */
static void rows_ko(const float *restrict x, const float *restrict w, float *restrict part,
                    int N, int64_t K, int64_t O, int64_t i0, int64_t i1) {
    memset(part, 0, sizeof(float) * N * O);
    for (int64_t i = i0; i < i1; i++) {
        const float *wi = w + i * O;
        for (int n = 0; n < N; n++) {
            const float a = x[n * K + i];
            float *p = part + n * O;
#pragma omp simd
            for (int64_t o = 0; o < O; o++) p[o] += a * wi[o];
        }
    }
}

/* Returns 0, or -1 when N is outside 1..MAX_ROWS or memory runs out (the caller uses its GEMM). */
int small_gemm(const float *x, const float *w, const float *bias, float *y, int N, int64_t K,
               int64_t O, int w_kn, int num_threads) {
    if (N < 1 || N > MAX_ROWS || num_threads < 1) return -1;
    if (w_kn) {
        const int T = num_threads;
        float *part = y;
        if (T > 1) {
            /* The partial sums' buffer is kept per calling thread: this runs every decode step,
             * and a fresh allocation of this size is an mmap plus page faults each time. */
            static __thread float *scratch = NULL;
            static __thread size_t capacity = 0;
            const size_t need = (size_t)T * N * O;
            if (need > capacity) {
                free(scratch);
                scratch = malloc(sizeof(float) * need);
                capacity = scratch ? need : 0;
            }
            if (!scratch) return -1;
            part = scratch;
        }
#pragma omp parallel num_threads(T)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            rows_ko(x, w, part + (int64_t)t * N * O, N, K, O, K * t / nt, K * (t + 1) / nt);
#pragma omp barrier
            if (T > 1) {
#pragma omp for schedule(static)
                for (int64_t j = 0; j < N * O; j++) {
                    float s = 0.0f;
                    for (int u = 0; u < nt; u++) s += part[(int64_t)u * N * O + j];
                    y[j] = s;
                }
            }
        }
    } else {
        /* Work items: runs of output features, several per thread so uneven cores even out. */
        const int64_t step = (O + 8 * num_threads - 1) / (8 * num_threads);
        const int64_t items = (O + step - 1) / step;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
        for (int64_t it = 0; it < items; it++) {
            const int64_t o0 = it * step, o1 = o0 + step < O ? o0 + step : O;
            switch (N) {  /* a constant row count keeps the accumulators in registers */
            case 1: rows_ok(x, w, y, 1, K, O, o0, o1); break;
            case 2: rows_ok(x, w, y, 2, K, O, o0, o1); break;
            case 3: rows_ok(x, w, y, 3, K, O, o0, o1); break;
            case 4: rows_ok(x, w, y, 4, K, O, o0, o1); break;
            case 5: rows_ok(x, w, y, 5, K, O, o0, o1); break;
            case 6: rows_ok(x, w, y, 6, K, O, o0, o1); break;
            case 7: rows_ok(x, w, y, 7, K, O, o0, o1); break;
            default: rows_ok(x, w, y, 8, K, O, o0, o1); break;
            }
        }
    }
    if (bias)
        for (int n = 0; n < N; n++)
            for (int64_t o = 0; o < O; o++) y[n * O + o] += bias[o];
    return 0;
}
