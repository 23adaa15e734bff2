/* Decode attention over a paged KV cache for CPUs: float32 queries and results, the cache in
 * float32, bfloat16 or float16 (vecmath.h's weight types: 16-bit keys and values are read
 * into float32 registers, half the bytes of a pass that is bound by memory).
 *
 * One query token per sequence attends to its cached keys and values, read in place from the
 * cache blocks its block table names: no gathered copy, no padding to the longest context.
 * A work item is one sequence and a range of its KV heads (the whole sequence when there are
 * enough sequences to keep every thread busy); it walks the sequence's blocks in order, so
 * each block is read from memory once, as one contiguous run. Softmax is computed online, one
 * block at a time, as in FlashAttention.
 *
 * Layouts (contiguous, row-major):
 *   q, out    (D, num_heads, head_dim)
 *   k_cache   (num_blocks, block_size, num_kv_heads, head_dim), v_cache the same
 *   tables    (D, max_blocks) int64 block ids; context (D,) int64 keys each sequence sees
 *   kvtype    W_F32, W_BF16 or W_F16 (vecmath.h), both caches
 * window > 0 limits each sequence to its last `window` keys (sliding-window attention).
 * Query head h uses KV head h / (num_heads / num_kv_heads).
 */
#include <float.h>
#include <string.h>

#include "vecmath.h"

/* Query heads sharing one KV head are processed QC at a time: each key and value row is loaded
 * once for all of them. */
#define QC 4

/* s[c] = scale * dot(q[c], k) for NC query heads against one key row. */
static inline __attribute__((always_inline)) void score_row(
        const float *restrict q, const void *restrict k, int64_t at, int NC, int hd,
        float scale, float *restrict s, int stride, int kvt) {
    v8 a[QC] = {{0}}, b[QC] = {{0}};
    int i = 0;
    for (; i + 16 <= hd; i += 16) {
        const v8 k0 = load8(k, at + i, kvt), k1 = load8(k, at + i + 8, kvt);
        for (int c = 0; c < NC; c++) {
            a[c] += *(const v8 *)(q + c * hd + i) * k0;
            b[c] += *(const v8 *)(q + c * hd + i + 8) * k1;
        }
    }
    if (i < hd)
        for (int c = 0; c < NC; c++) a[c] += *(const v8 *)(q + c * hd + i) * load8(k, at + i, kvt);
    for (int c = 0; c < NC; c++) s[c * stride] = hsum8(a[c] + b[c]) * scale;
}

/* acc[c] += sum over t of s[c][t] v[t] for NC heads: the accumulators stay in registers across
 * the block's tokens, two sets (even and odd tokens) to keep two FMA chains per head going. */
static inline __attribute__((always_inline)) void weigh_values(
        float *restrict acc, const void *restrict v, int64_t at, int64_t row, int t0, int t1,
        int NC, int hd, const float *restrict s, int stride, int kvt) {
    for (int i = 0; i < hd; i += 8) {
        v8 a[QC], b[QC];
        for (int c = 0; c < NC; c++) {
            a[c] = *(const v8 *)(acc + c * hd + i);
            b[c] = (v8){0};
        }
        int t = t0;
        for (; t + 2 <= t1; t += 2) {
            const v8 v0 = load8(v, at + t * row + i, kvt);
            const v8 v1 = load8(v, at + (t + 1) * row + i, kvt);
            for (int c = 0; c < NC; c++) {
                a[c] += s[c * stride + t] * v0;
                b[c] += s[c * stride + t + 1] * v1;
            }
        }
        if (t < t1) {
            const v8 v0 = load8(v, at + t * row + i, kvt);
            for (int c = 0; c < NC; c++) a[c] += s[c * stride + t] * v0;
        }
        for (int c = 0; c < NC; c++) *(v8 *)(acc + c * hd + i) = a[c] + b[c];
    }
}

/* Query heads [h, h + n) share one KV head; a constant n (1..QC) unrolls the head loop. */
#define BY_HEADS(n, call)                                      \
    switch (n) {                                               \
    case 1: { const int NC = 1; call; } break;                 \
    case 2: { const int NC = 2; call; } break;                 \
    case 3: { const int NC = 3; call; } break;                 \
    default: { const int NC = QC; call; } break;               \
    }

/* Prefetch the rows of KV heads [g0, g1) of a block's tokens, keys and values. */
static inline void fetch_block(const void *k_cache, const void *v_cache, int64_t base,
                               int64_t row, int g0, int g1, int hd, int bs, int64_t esize) {
    for (int t = 0; t < bs; t++)
        for (int64_t i = g0 * hd * esize; i < g1 * hd * esize; i += 64) {
            __builtin_prefetch((const char *)k_cache + (base + t * row) * esize + i);
            __builtin_prefetch((const char *)v_cache + (base + t * row) * esize + i);
        }
}

/* KV heads [g0, g1) of one sequence and their query heads (q and out start at head g0 * G). */
static inline __attribute__((always_inline)) void attend(
        const float *restrict q, const void *restrict k_cache, const void *restrict v_cache,
        const int64_t *restrict table, int64_t first, int64_t last, int g0, int g1, int G,
        int bs, int nkv, int hd, float scale, float *restrict out, int kvt, int fetch) {
    const int64_t esize = kvt == W_F32 ? 4 : 2;
    const int H = (g1 - g0) * G;
    float acc[H * hd], m[H], l[H], s[H * bs];
    for (int h = 0; h < H; h++) {
        m[h] = -FLT_MAX;
        l[h] = 0.0f;
    }
    memset(acc, 0, sizeof(acc));
    const int64_t row = (int64_t)nkv * hd;  /* floats between two tokens of a block */
    const int64_t start = first - first % bs;
    if (fetch && start < last)
        fetch_block(k_cache, v_cache, table[start / bs] * bs * row, row, g0, g1, hd, bs, esize);
    for (int64_t pos = start; pos < last; pos += bs) {
        const int64_t base = table[pos / bs] * bs * row;
        const int t0 = pos < first ? (int)(first - pos) : 0;
        const int t1 = last - pos < bs ? (int)(last - pos) : bs;
        /* With few sequences (fetch), the next block's keys and values are requested now, all
         * at once: a decode step's cache was evicted by the weights streamed since this layer
         * last ran, and read row by row (a KV head's share of a token: 128 bytes of every 512
         * in llama-110m) the misses went one after another (batch 1, 200 tokens: 43-67 -> 29-31
         * us a layer in a bfloat16 decode step). With a sequence an item the prefetches cost
         * more than they hid (16-64 sequences: 10-20% slower). */
        if (fetch && pos + bs < last)
            fetch_block(k_cache, v_cache, table[(pos + bs) / bs] * bs * row, row, g0, g1, hd,
                        bs, esize);
        /* Scores token by token, so the block's keys are read in address order (a pass per KV
         * head would stride through it); without fetch, the values are fetched alongside for
         * the pass below. */
        for (int t = t0; t < t1; t++) {
            const int64_t kt = base + t * row;
            if (!fetch)
                for (int64_t i = g0 * hd * esize; i < g1 * hd * esize; i += 64)
                    __builtin_prefetch((const char *)v_cache + kt * esize + i);
            for (int g = g0; g < g1; g++)
                for (int c0 = 0; c0 < G; c0 += QC) {
                    const int h = (g - g0) * G + c0;
                    BY_HEADS(G - c0, score_row(q + (int64_t)h * hd, k_cache, kt + g * hd, NC,
                                               hd, scale, s + h * bs + t, bs, kvt));
                }
        }
        /* Online softmax: s becomes this block's weights under the running maximum. */
        for (int h = 0; h < H; h++) {
            float *sh = s + h * bs;
            float mx = m[h];
            for (int t = t0; t < t1; t++) mx = sh[t] > mx ? sh[t] : mx;
            float sum = 0.0f;
            int t = t0;
            for (; t + 8 <= t1; t += 8) {
                const v8 e = exp_neg8(*(v8 *)(sh + t) - mx);
                *(v8 *)(sh + t) = e;
                sum += hsum8(e);
            }
            for (; t < t1; t++) {
                sh[t] = exp_neg(sh[t] - mx);
                sum += sh[t];
            }
            if (mx > m[h]) {
                const float correction = exp_neg(m[h] - mx);
                l[h] *= correction;
                for (int i = 0; i < hd; i++) acc[h * hd + i] *= correction;
                m[h] = mx;
            }
            l[h] += sum;
        }
        for (int g = g0; g < g1; g++)
            for (int c0 = 0; c0 < G; c0 += QC) {
                const int h = (g - g0) * G + c0;
                BY_HEADS(G - c0, weigh_values(acc + h * hd, v_cache, base + g * hd, row, t0,
                                              t1, NC, hd, s + h * bs, bs, kvt));
            }
    }
    for (int h = 0; h < H; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (int i = 0; i < hd; i++) out[(int64_t)h * hd + i] = acc[h * hd + i] * inv;
    }
}

typedef void (*attend_fn)(const float *, const void *, const void *, const int64_t *, int64_t,
                          int64_t, int, int, int, int, int, int, float, float *, int);
#define ATTEND(NAME, KVT)                                                                   \
    static void NAME(const float *q, const void *k, const void *v, const int64_t *table,    \
                     int64_t first, int64_t last, int g0, int g1, int G, int bs, int nkv,   \
                     int hd, float scale, float *out, int fetch) {                          \
        attend(q, k, v, table, first, last, g0, g1, G, bs, nkv, hd, scale, out, KVT, fetch); \
    }
ATTEND(attend_f32, W_F32)
ATTEND(attend_bf16, W_BF16)
ATTEND(attend_f16, W_F16)

/* Returns 0, or -1 for shapes this kernel does not take (the caller falls back). */
int paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                           const int64_t *tables, const int64_t *context, float *out,
                           int64_t D, int64_t max_blocks, int nh, int nkv, int hd, int bs,
                           int64_t window, float scale, int num_threads, int kvtype,
                           int64_t q_stride) {
    if (nkv <= 0 || nh % nkv || hd % 8 || hd > 512 || bs > 256 || nh > 256
            || (kvtype != W_F32 && kvtype != W_BF16 && kvtype != W_F16))
        return -1;
    const attend_fn attend_one = kvtype == W_BF16 ? attend_bf16
                                 : kvtype == W_F16 ? attend_f16 : attend_f32;
    const int G = nh / nkv;
    /* Split a sequence's KV heads only when sequences alone would leave threads idle. */
    int splits = 1;
    while (splits < nkv && D * splits < 4 * num_threads) splits *= 2;
    while (nkv % splits) splits--;
    const int per = nkv / splits;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t item = 0; item < D * splits; item++) {
        const int64_t d = item / splits;
        const int g0 = (int)(item % splits) * per;
        const int64_t last = context[d];
        const int64_t first = window > 0 && last > window ? last - window : 0;
        const int64_t head = (int64_t)g0 * G * hd;  /* q's rows q_stride apart, out's packed */
        attend_one(q + d * q_stride + head, k_cache, v_cache, tables + d * max_blocks, first,
                   last, g0, g0 + per, G, bs, nkv, hd, scale, out + d * nh * hd + head,
                   splits > 1);
    }
    return 0;
}
