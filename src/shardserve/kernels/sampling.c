/* One draw per row from the categorical distributions given by rows of non-negative weights,
 * for the sampler: PyTorch's multinomial costs about 1.3 ms per 32000-token row here, this a
 * few tens of microseconds.
 *
 *   p (B, V) float32 weights, not necessarily normalised; u (B,) uniform numbers in [0, 1);
 *   out[b] = the first index whose running sum of weights exceeds u[b] * total (inverse CDF),
 *   or -1 when the row's total is not a positive finite number.
 *
 * Sums run in double, so a token's chance is its weight's share of the row to double
 * precision whatever the vocabulary size, and a zero weight is never drawn.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vecmath.h"

int sample_rows(const float *p, const double *u, int64_t *out, int64_t B, int64_t V,
                int num_threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (B > 1)
    for (int64_t b = 0; b < B; b++) {
        const float *row = p + b * V;
        double part[4] = {0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 4 <= V; i += 4)
            for (int j = 0; j < 4; j++) part[j] += row[i + j];
        for (; i < V; i++) part[0] += row[i];
        const double total = (part[0] + part[1]) + (part[2] + part[3]);
        if (!(total > 0) || !isfinite(total)) {
            out[b] = -1;
            continue;
        }
        const double target = u[b] * total;
        double acc = 0;
        int64_t pick = -1;
        for (i = 0; i < V; i++) {
            if (row[i] > 0) {
                pick = i;  /* rounding may leave acc just under target: the last positive */
                acc += row[i];
                if (acc > target) break;
            }
        }
        out[b] = pick;
    }
    return 0;
}

/* The same draw from softmax(x / T) without forming it (a row with no top-k, top-p or min-p
 * filter: what most sampled requests ask for): per row, weights exp((x - max) / T) into a
 * row-sized buffer that stays in cache, then sample_rows's double sums and scan over it.
 * PyTorch's softmax and the draw over its result read and write the (B, V) matrix three times.
 *
 *   x (B, V) float32 finite logits; mx (B,) each row's max; inv_t (B,) 1 / temperature;
 *   u (B,) uniforms in [0, 1); out (B,) as sample_rows. A weight under exp(-87) (a
 *   probability below 1e-38 of the row's largest) is zero.
 */
int sample_logits(const float *x, const float *mx, const float *inv_t, const double *u,
                  int64_t *out, int64_t B, int64_t V, int num_threads) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (B > 1)
    {
        float *w = malloc((size_t)V * sizeof(float));
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            if (!w) continue;
            const float *row = x + b * V;
            const v8 m = (v8){0} + mx[b], s = (v8){0} + inv_t[b], lo = (v8){0} - 87.0f;
            int64_t i = 0;
            for (; i + 8 <= V; i += 8) {
                const v8 z = (*(const v8 *)(row + i) - m) * s;
                *(v8 *)(w + i) = (v8)((v8i)exp_neg8(z) & (z >= lo));
            }
            for (; i < V; i++) {
                const float z = (row[i] - mx[b]) * inv_t[b];
                w[i] = z >= -87.0f ? exp_neg(z) : 0.0f;
            }
            sample_rows(w, u + b, out + b, 1, V, 1);
        }
        free(w);
    }
    return failed ? -1 : 0;
}

/* For greedy rows and the sampler's finiteness check, in one pass over the logits instead of
 * PyTorch's three (max, min, argmax: ~2.5 ms for 64 rows of 32000 here, single-threaded argmax
 * the most of it). Per row of x (B, V) float32: mx[b] and mn[b] its largest and smallest
 * values (NaN when the row holds a NaN), idx[b] the first index of the largest, as
 * torch.argmax (-1 for a row with a NaN). */
int row_argmax(const float *x, int64_t *idx, float *mx, float *mn, int64_t B, int64_t V,
               int num_threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (B > 1)
    for (int64_t b = 0; b < B; b++) {
        const float *row = x + b * V;
        float hi = -INFINITY, lo = INFINITY;
        int nan = 0;
        int64_t i = 0;
#if defined(__AVX2__)
        __m256 vhi = _mm256_set1_ps(-INFINITY), vlo = _mm256_set1_ps(INFINITY);
        __m256 vnan = _mm256_setzero_ps();
        for (; i + 8 <= V; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            vhi = _mm256_max_ps(vhi, v);
            vlo = _mm256_min_ps(vlo, v);
            vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float h8[8], l8[8];
        _mm256_storeu_ps(h8, vhi);
        _mm256_storeu_ps(l8, vlo);
        for (int j = 0; j < 8; j++) {
            hi = h8[j] > hi ? h8[j] : hi;
            lo = l8[j] < lo ? l8[j] : lo;
        }
        nan = _mm256_movemask_ps(vnan) != 0;
#endif
        for (; i < V; i++) {
            const float v = row[i];
            nan |= v != v;
            hi = v > hi ? v : hi;
            lo = v < lo ? v : lo;
        }
        if (nan) {
            mx[b] = mn[b] = NAN;
            idx[b] = -1;
            continue;
        }
        mx[b] = hi;
        mn[b] = lo;
        int64_t at = 0;
        while (at < V && row[at] != hi) at++;
        idx[b] = at < V ? at : 0;
    }
    return 0;
}
