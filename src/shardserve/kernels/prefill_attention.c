/* Prefill attention for CPUs, float32: a chunk of n query tokens, the last n positions of a
 * context of ctx tokens, attends causally (and within a sliding window, if any) to the
 * context's keys and values, every head in one call.
 *
 * At the lengths of a typical prompt (tens to a few hundred tokens) attention is a few MFLOP a
 * layer and PyTorch's flash kernel spends most of its time around them (a 128-token chunk of
 * llama-110m's 12 heads: ~0.4 ms a layer where the arithmetic is ~0.1 ms). Here a work item
 * is one KV head and a block of query tokens; the rows of its tile are those tokens times the
 * query heads sharing the KV head (GQA), so each key and value is read once for all of them:
 *   1. S = scale * Q K^T over the keys any row of the block may see, as a small GEMM against
 *      the head's keys transposed once per call (KT, hd x ctx);
 *   2. each row's softmax over its own keys (its position, the window), other entries zero;
 *   3. out = P V / sum, a small GEMM against the value rows.
 * The whole score row is kept (no online softmax); contexts over MAX_CTX return -1 and the
 * caller keeps PyTorch's flash kernel, which is faster there (12 heads of 64 over 4 KV heads,
 * 2 threads: 128 tokens 0.24 ms against its 0.35, 1024 8.2 against 10.4, 2048 39.7 against
 * 35.1).
 *
 * Layouts: q (n, nh, hd) with token rows q_stride floats apart, a token's heads contiguous;
 * k and v (ctx, nkv, hd) with token rows k_stride / v_stride apart and heads kh_stride /
 * vh_stride apart (the step's QKV output, or keys gathered from the cache); out (n, nh, hd)
 * contiguous. Query head h reads KV head h / (nh / nkv).
 */
#include <float.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vecmath.h"

#define NV 4           /* vectors per micro-tile row: 4 x LANES keys, or head features */
#define MR 6           /* rows per micro-tile: MR x NV accumulators + NV loads + a broadcast */
#define ROWS 32        /* rows (tokens x heads of a group) per work item, about */
#define MAX_CTX 1024   /* keys a call may have (measured: at 2048 PyTorch's flash is faster) */

static inline vec bcast(float x) { return (vec){0} + x; }

/* s[i][j] = scale * sum_d q[i][d] kt[d][j] for mr rows, j < NV * LANES: q rows at qs[i]. */
static inline __attribute__((always_inline)) void score_tile(
        int mr, const float *const *qs, const float *restrict kt, int64_t ldk, int hd,
        float scale, float *restrict s, int64_t lds) {
    vec acc[MR][NV];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = (vec){0};
    for (int d = 0; d < hd; d++) {
        vec b[NV];
        for (int v = 0; v < NV; v++) b[v] = *(const vec *)(kt + d * ldk + v * LANES);
        for (int i = 0; i < mr; i++) {
            const vec a = bcast(qs[i][d]);
            for (int v = 0; v < NV; v++) acc[i][v] += a * b[v];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < NV; v++) *(vec *)(s + i * lds + v * LANES) = acc[i][v] * scale;
}

/* o[i][0:nv*LANES] = inv[i] * sum_{j in [j0, j1)} p[i][j] v[j][...] for mr rows. */
static inline __attribute__((always_inline)) void value_tile(
        int mr, int nv, const float *restrict p, int64_t ldp, const float *restrict vrow,
        int64_t vs, int64_t j0, int64_t j1, const float *restrict inv, float *const *os) {
    vec acc[MR][NV];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = (vec){0};
    for (int64_t j = j0; j < j1; j++) {
        vec b[NV];
        for (int v = 0; v < nv; v++) b[v] = *(const vec *)(vrow + j * vs + v * LANES);
        for (int i = 0; i < mr; i++) {
            const vec a = bcast(p[i * ldp + j]);
            for (int v = 0; v < nv; v++) acc[i][v] += a * b[v];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) *(vec *)(os[i] + v * LANES) = acc[i][v] * inv[i];
}

#define BY_ROWS(mr, call)                       \
    switch (mr) {                               \
    case 1: { const int R = 1; call; } break;   \
    case 2: { const int R = 2; call; } break;   \
    case 3: { const int R = 3; call; } break;   \
    case 4: { const int R = 4; call; } break;   \
    case 5: { const int R = 5; call; } break;   \
    default: { const int R = MR; call; } break; \
    }

/* Returns 0, or -1 for what it does not take (the caller keeps its own path). */
int prefill_attention(const float *q, const float *k, const float *v, float *out, int64_t n,
                      int64_t ctx, int nh, int nkv, int hd, int64_t q_stride, int64_t k_stride,
                      int64_t kh_stride, int64_t v_stride, int64_t vh_stride, int64_t window,
                      float scale, int num_threads) {
    if (n < 1 || ctx < n || ctx > MAX_CTX || nkv < 1 || nh % nkv || hd < LANES || hd % LANES
            || hd > 1024 || num_threads < 1)
        return -1;
    const int G = nh / nkv;
    const int64_t ldk = (ctx + NV * LANES - 1) / (NV * LANES) * (NV * LANES) + NV * LANES;
    float *kt = aligned_alloc(64, (size_t)(nkv * hd * ldk) * 4);
    if (!kt) return -1;
    const int64_t tokens = ROWS / G > 0 ? ROWS / G : 1;  /* query tokens per item */
    const int64_t blocks = (n + tokens - 1) / tokens, items = blocks * nkv;
    const int64_t first = ctx - n;  /* position of query token 0 */
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* Keys transposed per KV head (a row of KT per feature), zero past ctx. */
#pragma omp for schedule(static)
        for (int64_t gd = 0; gd < (int64_t)nkv * hd; gd++) {
            const int64_t g = gd / hd, d = gd % hd;
            float *row = kt + gd * ldk;
            for (int64_t j = 0; j < ctx; j++) row[j] = k[j * k_stride + g * kh_stride + d];
            for (int64_t j = ctx; j < ldk; j++) row[j] = 0.0f;
        }
        const int64_t rows_max = tokens * G;
        float *s = aligned_alloc(64, (size_t)(rows_max * ldk) * 4);
        float *inv = malloc((size_t)rows_max * 4);
        if (!s || !inv) {
#pragma omp atomic write
            failed = 1;
        }
        /* the last blocks see the most keys: they go first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
            const int64_t b = blocks - 1 - it / nkv, g = it % nkv;
            const int64_t t0 = b * tokens, t1 = t0 + tokens < n ? t0 + tokens : n;
            const int64_t rows = (t1 - t0) * G;
            /* keys the block's rows may see: [lo, hi) */
            const int64_t hi = first + t1;
            const int64_t lo = window > 0 && first + t0 - window + 1 > 0
                               ? first + t0 - window + 1 : 0;
            const float *qs[MR];
            float *os[MR];
            /* 1. scores, MR rows x NV * LANES keys a tile (keys past hi are masked below) */
            for (int64_t r0 = 0; r0 < rows; r0 += MR) {
                const int mr = rows - r0 < MR ? (int)(rows - r0) : MR;
                for (int i = 0; i < mr; i++) {
                    const int64_t r = r0 + i, t = t0 + r / G, h = g * G + r % G;
                    qs[i] = q + t * q_stride + h * hd;
                }
                for (int64_t j = lo; j < hi; j += NV * LANES)
                    BY_ROWS(mr, score_tile(R, qs, kt + g * hd * ldk + j, ldk, hd, scale,
                                           s + r0 * ldk + (j - lo), ldk));
            }
            /* 2. softmax of each row over its own keys; the rest of [lo, hi) weighs 0 */
            for (int64_t r = 0; r < rows; r++) {
                const int64_t pos = first + t0 + r / G;
                const int64_t a = window > 0 && pos - window + 1 > lo ? pos - window + 1 : lo;
                float *sr = s + r * ldk - lo;  /* sr[j]: key j */
                vec m = bcast(-FLT_MAX);
                int64_t j = a;
                for (; j + LANES <= pos + 1; j += LANES) {
                    const vec x = *(const vec *)(sr + j);
                    const veci gt = x > m;
                    m = (vec)(((veci)x & gt) | ((veci)m & ~gt));
                }
                float mx = -FLT_MAX;
                for (int l = 0; l < LANES; l++) mx = m[l] > mx ? m[l] : mx;
                for (; j <= pos; j++) mx = sr[j] > mx ? sr[j] : mx;
                for (j = lo; j < a; j++) sr[j] = 0.0f;
                vec sum = (vec){0};
                for (j = a; j + LANES <= pos + 1; j += LANES) {
                    const vec e = exp_negv(*(const vec *)(sr + j) - mx);
                    *(vec *)(sr + j) = e;
                    sum += e;
                }
                float total = 0.0f;
                for (int l = 0; l < LANES; l++) total += sum[l];
                for (; j <= pos; j++) {
                    sr[j] = exp_neg(sr[j] - mx);
                    total += sr[j];
                }
                for (j = pos + 1; j < hi; j++) sr[j] = 0.0f;
                inv[r] = 1.0f / total;
            }
            /* 3. out = P V / sum, MR rows x NV * LANES features a tile, over the keys any of
             * the tile's rows sees */
            for (int64_t r0 = 0; r0 < rows; r0 += MR) {
                const int mr = rows - r0 < MR ? (int)(rows - r0) : MR;
                const int64_t last = first + t0 + (r0 + mr - 1) / G + 1;
                for (int64_t d0 = 0; d0 < hd; d0 += NV * LANES) {
                    const int nv = hd - d0 < NV * LANES ? (int)((hd - d0) / LANES) : NV;
                    for (int i = 0; i < mr; i++) {
                        const int64_t r = r0 + i, t = t0 + r / G, h = g * G + r % G;
                        os[i] = out + (t * nh + h) * hd + d0;
                    }
                    const float *vrow = v + g * vh_stride + d0;
                    const float *p = s + r0 * ldk - lo;
                    switch (nv) {  /* constant counts: the tile stays in registers */
                    case 1: BY_ROWS(mr, value_tile(R, 1, p, ldk, vrow, v_stride, lo, last,
                                                   inv + r0, os)); break;
                    case 2: BY_ROWS(mr, value_tile(R, 2, p, ldk, vrow, v_stride, lo, last,
                                                   inv + r0, os)); break;
                    case 3: BY_ROWS(mr, value_tile(R, 3, p, ldk, vrow, v_stride, lo, last,
                                                   inv + r0, os)); break;
                    default: BY_ROWS(mr, value_tile(R, NV, p, ldk, vrow, v_stride, lo, last,
                                                    inv + r0, os)); break;
                    }
                }
            }
        }
        free(s);
        free(inv);
    }
    free(kt);
    return failed ? -1 : 0;
}
