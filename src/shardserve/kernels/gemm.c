/* y = x W^T (+ b), float32, for CPUs, with W repacked once at load time: every row count of a
 * serving step (1 to a few thousand) in one kernel.
 *
 * A linear layer's weight W (O, K) is stored as panels of NR output features, each panel
 * K-major: P[q][k][j] = W[q * NR + j][k]. The micro-kernel keeps an MR x NR tile of y in
 * registers and, for every k, loads one row of the panel (NR contiguous floats) and broadcasts
 * MR values of x: MR * NR / LANES FMAs per NR / LANES + MR loads, and the panel is read in
 * address order, so one pass streams the weights once however few rows there are. At decode
 * batch sizes (16-64 rows) PyTorch's GEMM (MKL) packs W on every call and reaches half of
 * what this does (benchmarks/kernels.py).
 *
 * Blocking: a panel's K is cut in blocks of KC (KC x NR floats, 128 KiB: L2) and all rows of
 * x run against one block before the next; a thread takes a contiguous run of panels (its own
 * slice of the weights) and, when there are fewer panels than threads can share, rows as well.
 *
 *   x (N, K) and y (N, O) contiguous, O a multiple of NR; p as above; bias (O,) or NULL
 */
#include <omp.h>
#include <stdint.h>

#if defined(__AVX512F__)
typedef float vec __attribute__((vector_size(64), aligned(4)));
#define LANES 16
#define NV 4  /* 6 x 4 accumulators + 4 panel loads + 1 broadcast of 32 registers */
#else
typedef float vec __attribute__((vector_size(32), aligned(4)));
#define LANES 8
#define NV 2  /* 6 x 2 + 2 + 1 of 16 registers */
#endif
#define NR (LANES * NV)
#define MR 6
#define KC 512

int packed_gemm_nr(void) { return NR; }

/* y[0:mr, 0:NR] (+)= x[0:mr, 0:kc] p[0:kc, 0:NR]; `first` starts from zero (or the bias when
 * given), otherwise from y. mr is a constant after inlining, so the tile stays in registers. */
static inline __attribute__((always_inline)) void micro(
        int mr, const float *restrict x, int64_t ldx, const float *restrict p, int kc,
        float *restrict y, int64_t ldy, int first, const float *restrict bias) {
    vec acc[MR][NV];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < NV; v++)
            acc[i][v] = !first ? *(const vec *)(y + i * ldy + v * LANES)
                        : bias ? *(const vec *)(bias + v * LANES) : (vec){0};
    for (int k = 0; k < kc; k++) {
        vec b[NV];
        for (int v = 0; v < NV; v++) b[v] = *(const vec *)(p + k * NR + v * LANES);
        for (int i = 0; i < mr; i++) {
            const vec a = (vec){0} + x[i * ldx + k];
            for (int v = 0; v < NV; v++) acc[i][v] += a * b[v];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < NV; v++) *(vec *)(y + i * ldy + v * LANES) = acc[i][v];
}

/* Rows [m0, m1) of y against panel block p (kc x NR). */
static void rows(const float *x, const float *p, float *y, int64_t m0, int64_t m1, int64_t K,
                 int64_t O, int kc, int first, const float *bias) {
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) micro(MR, x + m * K, K, p, kc, y + m * O, O, first, bias);
    switch (m1 - m) {  /* the last rows, with a constant count each */
    case 0: break;
    case 1: micro(1, x + m * K, K, p, kc, y + m * O, O, first, bias); break;
    case 2: micro(2, x + m * K, K, p, kc, y + m * O, O, first, bias); break;
    case 3: micro(3, x + m * K, K, p, kc, y + m * O, O, first, bias); break;
    case 4: micro(4, x + m * K, K, p, kc, y + m * O, O, first, bias); break;
    default: micro(5, x + m * K, K, p, kc, y + m * O, O, first, bias); break;
    }
}

/* Returns 0, or -1 for a shape it does not take (the caller runs its own GEMM). */
int packed_gemm(const float *x, const float *p, const float *bias, float *y, int64_t N,
                int64_t K, int64_t O, int num_threads) {
    if (N < 1 || K < 1 || O < NR || O % NR || num_threads < 1) return -1;
    const int64_t panels = O / NR;
    /* Rows are split too only when panels alone would leave threads idle and the rows are
     * many: splitting rows makes each thread read the same weights again. */
    int64_t parts = 1;
    while (panels * parts < 4 * num_threads && N / (2 * parts) >= 8 * MR) parts *= 2;
    const int64_t items = panels * parts;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t it = 0; it < items; it++) {
        const int64_t q = it / parts, part = it % parts;
        const int64_t m0 = N * part / parts, m1 = N * (part + 1) / parts;
        const float *pq = p + q * K * NR;
        const float *bq = bias ? bias + q * NR : 0;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int kc = K - k0 < KC ? (int)(K - k0) : KC;
            rows(x + k0, pq + k0 * NR, y + q * NR, m0, m1, K, O, kc, k0 == 0, bq);
        }
    }
    return 0;
}
