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
 * Blocking: rows of x in blocks of up to MC, a panel's K in blocks of KC (KC x NR floats);
 * a row block runs against one K block of a few adjacent panels before the next K block, so
 * the x block stays in L2 and each panel block is read once per row block (see packed_gemm).
 *
 * Weights may be float32, 16-bit (bfloat16, float16: vecmath.h) or int8, converted to float32
 * as each panel row is loaded, once for the MR rows of the tile; x, y and the bias are
 * float32. int8 weights W = scale[o] * P (weight-only quantization, one scale per output
 * feature): the tile accumulates x P over all of K and the last K block multiplies by the
 * scales and adds the bias, so the scales cost nothing per weight.
 *
 *   x (N, K) and y (N, O) contiguous, O a multiple of NR; p as above; bias (O,) or NULL;
 *   scale (O,) for int8 weights, else NULL
 */
#include <omp.h>
#include <stdint.h>

#include "vecmath.h"

#if LANES == 16
#define NV 4  /* 6 x 4 accumulators + 4 panel loads + 1 broadcast of 32 registers */
#else
#define NV 2  /* 6 x 2 + 2 + 1 of 16 registers */
#endif
#define NR (LANES * NV)
#define MR 6
/* K in blocks of 128: a panel block (32 KiB) read by every tile of a row block stays in L1
 * (16-128 rows 5-12% faster than blocks of 512, 256-512 rows level) */
#define KC 128
#define MC 120  /* rows per block of x: MC x KC floats (60 KiB) */
/* Software prefetch this far ahead while a tile streams a panel block from memory: at decode
 * sizes the hardware prefetcher alone left a 16-bit panel stream at ~10 GB/s of an AVX2
 * machine's ~21 (a bfloat16 llama-110m decode step: 17 -> 12.4 ms of linear layers). Every
 * line of a panel row, into every cache level (prefetcht0): on a Sapphire Rapids core the
 * non-temporal hint kept the block out of L2, where the tiles after the first read it, and
 * one line per row left 3 of an AVX-512 float32 row's 4 to the hardware (768 -> 2048, cold
 * weights, 2 threads: 64 rows 119 -> 191 GFLOP/s, MKL 163; one row 7 -> 12, MKL 10). */
#define PF_BYTES 4096

int packed_gemm_nr(void) { return NR; }

/* x[0] in every lane, one load: `(vec){0} + x` would add a zero first (it must, for -0). */
static inline vec bcast(const float *x) {
#if LANES == 16
    return (vec)_mm512_set1_ps(*x);
#else
    return (vec)_mm256_set1_ps(*x);
#endif
}

/* LANES consecutive weights of type wtype (elements from p + i) as floats. */
static inline vec loadv(const void *p, int64_t i, int wtype) {
    if (wtype == W_F32) return *(const vec *)((const float *)p + i);
    if (wtype == W_I8) {
        const int8_t *b = (const int8_t *)p + i;
#if LANES == 16
        return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b)));
#else
        return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b)));
#endif
    }
    const uint16_t *h = (const uint16_t *)p + i;
#if LANES == 16
    const __m256i raw = _mm256_loadu_si256((const __m256i *)h);
    if (wtype == W_BF16) return (vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
    return (vec)_mm512_cvtph_ps(raw);
#else
    return wtype == W_BF16 ? (vec)bf16x8(h) : (vec)f16x8(h);
#endif
}

/* y[0:mr, 0:NR] (+)= x[0:mr, 0:kc] p[0:kc, 0:NR] (p: elements from p0 + off); `first` starts
 * from zero (or the bias when given), otherwise from y. With int8 weights the bias and the
 * scales come in at the `last` block instead. mr and wtype are constants after inlining, so
 * the tile stays in registers. `stream` prefetches this block ahead of use (its first tile,
 * when nothing fetched it before); `next`, when set, is the block this thread runs next, of
 * which the tile prefetches into L2 the panel rows k with k % tiles == tile. */
static inline __attribute__((always_inline)) void micro(
        int mr, const float *restrict x, int64_t ldx, const void *restrict p0, int64_t off,
        int kc, float *restrict y, int64_t ldy, int first, int last, const float *restrict bias,
        const float *restrict scale, int wtype, int stream, const char *restrict next, int tile,
        int tiles) {
    vec acc[MR][NV];
    const int late_bias = wtype == W_I8;
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < NV; v++)
            acc[i][v] = !first ? *(const vec *)(y + i * ldy + v * LANES)
                        : bias && !late_bias ? *(const vec *)(bias + v * LANES) : (vec){0};
    const int64_t wsize = wtype == W_F32 ? 4 : wtype == W_I8 ? 1 : 2;
    const char *pb = (const char *)p0 + off * wsize;
    for (int k = 0; k < kc; k++) {
        if (stream)  /* every cache line of the panel row (4 for an AVX-512 float32 one) */
            for (int64_t l = 0; l < NR * wsize; l += 64)
                __builtin_prefetch(pb + (k * NR) * wsize + PF_BYTES + l, 0, 3);
        if (next && k % tiles == tile)
            for (int64_t l = 0; l < NR * wsize; l += 64)
                __builtin_prefetch(next + (k * NR) * wsize + l, 0, 2);
        vec b[NV];
        for (int v = 0; v < NV; v++) b[v] = loadv(p0, off + k * NR + v * LANES, wtype);
        for (int i = 0; i < mr; i++) {
            const vec a = bcast(x + i * ldx + k);
            for (int v = 0; v < NV; v++) acc[i][v] += a * b[v];
        }
    }
    if (late_bias && last)
        for (int v = 0; v < NV; v++) {
            const vec s = *(const vec *)(scale + v * LANES);
            const vec b = bias ? *(const vec *)(bias + v * LANES) : (vec){0};
            for (int i = 0; i < mr; i++) acc[i][v] = acc[i][v] * s + b;
        }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < NV; v++) *(vec *)(y + i * ldy + v * LANES) = acc[i][v];
}

/* Rows [m0, m1) of y against the panel block at element `off` of p (kc x NR); `next_off` is
 * the block this thread runs next (-1: none known), `cold` that nothing prefetched this one.
 *
 * One tile (a few rows) streams the block from memory, prefetched a little ahead. With more,
 * the first tile alone used to stream it and the rest found it in L2, so the memory stream
 * stopped while they computed (one core, 32 rows of a llama-110m layer: 4.7 ms, 3.5 ms with
 * the weights in cache); now every tile also prefetches its share of the next block, and the
 * stream runs under the arithmetic (3.9 ms; 8-128 rows on two cores 11-15% faster). */
static inline __attribute__((always_inline)) void rows(
        const float *x, const void *p, int64_t off, float *y, int64_t m0, int64_t m1,
        int64_t K, int64_t O, int kc, int first, int last, const float *bias,
        const float *scale, int wtype, int64_t next_off, int cold) {
    const int tiles = (int)((m1 - m0 + MR - 1) / MR);
    const int64_t wsize = wtype == W_F32 ? 4 : wtype == W_I8 ? 1 : 2;
    const char *next = tiles > 1 && next_off >= 0 ? (const char *)p + next_off * wsize : 0;
    const int s0 = cold || tiles == 1;
#define TILE(MROWS, STREAM) micro(MROWS, x + m * K, K, p, off, kc, y + m * O, O, first, last, \
                                  bias, scale, wtype, STREAM, next, (int)((m - m0) / MR), tiles)
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) TILE(MR, m == m0 && s0);
    const int s = m == m0 && s0;
    switch (m1 - m) {  /* the last rows, with a constant count each */
    case 0: break;
    case 1: TILE(1, s); break;
    case 2: TILE(2, s); break;
    case 3: TILE(3, s); break;
    case 4: TILE(4, s); break;
    default: TILE(5, s); break;
    }
#undef TILE
}

typedef void (*rows_fn)(const float *, const void *, int64_t, float *, int64_t, int64_t,
                        int64_t, int64_t, int, int, int, const float *, const float *, int64_t,
                        int);
#define ROWS(NAME, WTYPE)                                                                   \
    static void NAME(const float *x, const void *p, int64_t off, float *y, int64_t m0,      \
                     int64_t m1, int64_t K, int64_t O, int kc, int first, int last,         \
                     const float *b, const float *s, int64_t nx, int cold) {                \
        rows(x, p, off, y, m0, m1, K, O, kc, first, last, b, s, WTYPE, nx, cold);           \
    }
ROWS(rows_f32, W_F32)
ROWS(rows_bf16, W_BF16)
ROWS(rows_f16, W_F16)
ROWS(rows_i8, W_I8)

/* Returns 0, or -1 for a shape or weight type it does not take (the caller runs its GEMM). */
int packed_gemm(const float *x, const void *p, const float *bias, const float *scale, float *y,
                int64_t N, int64_t K, int64_t O, int num_threads, int wtype) {
    if (N < 1 || K < 1 || O < NR || O % NR || num_threads < 1 || wtype < W_F32
            || wtype > W_I8 || (wtype == W_I8) != (scale != 0))
        return -1;
    const rows_fn block = wtype == W_BF16 ? rows_bf16 : wtype == W_F16 ? rows_f16
                          : wtype == W_I8 ? rows_i8 : rows_f32;
    const int64_t panels = O / NR;
    /* Rows in blocks of at most MC; smaller ones (never under 8 tiles) only when there are too
     * few panels to keep the threads busy, since each row block reads the weights again. */
    int64_t rb = MC;
    while (panels * ((N + rb - 1) / rb) < 4 * num_threads && rb / 2 >= 8 * MR) rb /= 2;
    const int64_t nb = (N + rb - 1) / rb;
    /* Work items: a row block against a group of G adjacent panels, K blocks outermost in an
     * item so the block of x stays in L2 while the group's panels run against it. Threads take
     * items as they finish (dynamic), at least 8 each where there are enough panels: a thread
     * the OS takes away for a while (the HTTP server, a client beside us) delays only its
     * item, where equal static shares would leave the other threads waiting at the end. */
    int64_t G = panels * nb / (8 * num_threads);
    G = G < 1 ? 1 : G > 8 ? 8 : G;
    const int64_t groups = (panels + G - 1) / G, items = nb * groups;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t it = 0; it < items; it++) {
        const int64_t b = it / groups, q0 = it % groups * G;
        const int64_t q1 = q0 + G < panels ? q0 + G : panels;
        const int64_t m0 = N * b / nb, m1 = N * (b + 1) / nb;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int kc = K - k0 < KC ? (int)(K - k0) : KC;
            for (int64_t q = q0; q < q1; q++) {
                /* The next block of this item: the next panel, or the group's first at the
                 * next K block; the first of an item is cold (items go to threads as they
                 * finish). */
                const int64_t next = q + 1 < q1 ? (q + 1) * K * NR + k0 * NR
                                     : k0 + KC < K ? q0 * K * NR + (k0 + KC) * NR : -1;
                block(x + k0, p, q * K * NR + k0 * NR, y + q * NR, m0, m1, K, O, kc, k0 == 0,
                      k0 + kc >= K, bias ? bias + q * NR : 0, scale ? scale + q * NR : 0, next,
                      k0 == 0 && q == q0);
            }
        }
    }
    return 0;
}
