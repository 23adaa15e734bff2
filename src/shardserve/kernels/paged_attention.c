/* Decode attention over a paged KV cache, float32, for CPUs.
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
 * window > 0 limits each sequence to its last `window` keys (sliding-window attention).
 * Query head h uses KV head h / (num_heads / num_kv_heads).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));  /* unaligned loads */

/* exp(x) for x <= 0 (softmax arguments): Cephes' polynomial, relative error about 2e-7;
 * unlike libm's expf it vectorizes. */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(x * 1.44269504f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

/* hd is a multiple of 8; two accumulators keep two FMA chains in flight. */
static inline float dot(const float *a, const float *b, int hd) {
    v8 s0 = {0}, s1 = {0};
    int i = 0;
    for (; i + 16 <= hd; i += 16) {
        s0 += *(const v8 *)(a + i) * *(const v8 *)(b + i);
        s1 += *(const v8 *)(a + i + 8) * *(const v8 *)(b + i + 8);
    }
    if (i < hd) s0 += *(const v8 *)(a + i) * *(const v8 *)(b + i);
    s0 += s1;
    return ((s0[0] + s0[4]) + (s0[1] + s0[5])) + ((s0[2] + s0[6]) + (s0[3] + s0[7]));
}

static inline void axpy(float *y, float a, const float *x, int hd) {
    const v8 av = {a, a, a, a, a, a, a, a};
    for (int i = 0; i < hd; i += 8) *(v8 *)(y + i) += av * *(const v8 *)(x + i);
}

/* Query heads [h0, h1) of one sequence; their KV heads are h / G. */
static void attend(const float *restrict q, const float *restrict k_cache,
                   const float *restrict v_cache, const int64_t *restrict table,
                   int64_t first, int64_t last, int h0, int h1, int G, int bs, int nkv,
                   int hd, float scale, float *restrict out) {
    const int H = h1 - h0;
    float acc[H][hd], m[H], l[H], s[H][bs];
    for (int h = 0; h < H; h++) {
        m[h] = -FLT_MAX;
        l[h] = 0.0f;
        memset(acc[h], 0, sizeof(float) * hd);
    }
    const int64_t row = (int64_t)nkv * hd;  /* floats between two tokens of a block */
    for (int64_t pos = first - first % bs; pos < last; pos += bs) {
        const int64_t block = table[pos / bs];
        const int t0 = pos < first ? (int)(first - pos) : 0;
        const int t1 = last - pos < bs ? (int)(last - pos) : bs;
        const float *kb = k_cache + block * bs * row;
        const float *vb = v_cache + block * bs * row;
        for (int t = t0; t < t1; t++)
            for (int h = 0; h < H; h++)
                s[h][t] = dot(q + (int64_t)h * hd, kb + t * row + ((h0 + h) / G) * hd, hd) * scale;
        /* Online softmax: s becomes this block's weights under the running maximum. */
        for (int h = 0; h < H; h++) {
            float mx = m[h];
            for (int t = t0; t < t1; t++) mx = s[h][t] > mx ? s[h][t] : mx;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = t0; t < t1; t++) {
                s[h][t] = exp_neg(s[h][t] - mx);
                sum += s[h][t];
            }
            if (mx > m[h]) {
                const float correction = exp_neg(m[h] - mx);
                l[h] *= correction;
                for (int i = 0; i < hd; i++) acc[h][i] *= correction;
                m[h] = mx;
            }
            l[h] += sum;
        }
        for (int t = t0; t < t1; t++)
            for (int h = 0; h < H; h++)
                axpy(acc[h], s[h][t], vb + t * row + ((h0 + h) / G) * hd, hd);
    }
    for (int h = 0; h < H; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (int i = 0; i < hd; i++) out[(int64_t)h * hd + i] = acc[h][i] * inv;
    }
}

/* Returns 0, or -1 for shapes this kernel does not take (the caller falls back). */
int paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                           const int64_t *tables, const int64_t *context, float *out,
                           int64_t D, int64_t max_blocks, int nh, int nkv, int hd, int bs,
                           int64_t window, float scale, int num_threads) {
    if (nkv <= 0 || nh % nkv || hd % 8 || hd > 512 || bs > 256 || nh > 256) return -1;
    const int G = nh / nkv;
    /* Split a sequence's KV heads only when sequences alone would leave threads idle. */
    int splits = 1;
    while (splits < nkv && D * splits < 4 * num_threads) splits *= 2;
    while (nkv % splits) splits--;
    const int per = nkv / splits;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t item = 0; item < D * splits; item++) {
        const int64_t d = item / splits;
        const int h0 = (int)(item % splits) * per * G, h1 = h0 + per * G;
        const int64_t last = context[d];
        const int64_t first = window > 0 && last > window ? last - window : 0;
        const int64_t at = (d * nh + h0) * hd;
        attend(q + at, k_cache, v_cache, tables + d * max_blocks, first, last, h0, h1, G, bs,
               nkv, hd, scale, out + at);
    }
    return 0;
}
