/* Sum pooling of a DLRM rank's embedding bags (models/dlrm.py), in one call where PyTorch
 * needs some twenty small operations to find each id's feature, keep the ids in this rank's
 * rows and offset them into its buffer of shards before its embedding_bag: at one sample
 * those operations, not the rows read, are the lookup's time.
 *
 *   rows (R, D) the rank's shards one after another, of weight type wtype (vecmath.h);
 *   values the ids feature by feature, sample by sample within a feature (TorchRec's
 *   KeyedJaggedTensor), lengths (F, B) ids per feature and sample;
 *   per feature f: base[f] its first row in rows (-1: not held here), start[f] the first
 *   table row held, count[f] how many;
 *   out (B, F, D) float32: each held bag's sum of the rows it hits here (ids outside this
 *   rank's rows of a row-wise table add nothing: another rank holds them), 0 elsewhere.
 *
 * Ids are checked against the table sizes before they get here (engine/validation.py); an
 * id outside this rank's rows is skipped, never read. Sums run in float32 in id order, as
 * PyTorch's float32 embedding_bag does. Returns 0, or -1 (nothing written) when a length is
 * negative or the lengths do not sum to n_values.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vecmath.h"

static inline float load1(const void *p, int64_t i, int wtype) {
    if (wtype == W_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    if (wtype == W_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

int pool_bags(const void *rows, int wtype, int64_t D, const int64_t *values, int64_t n_values,
              const int64_t *lengths, int64_t F, int64_t B, const int64_t *base,
              const int64_t *start, const int64_t *count, float *out, int num_threads) {
    const int64_t bags = F * B;
    int64_t stack[512];
    int64_t *first = bags <= 512 ? stack : malloc(bags * sizeof(int64_t));
    if (first == NULL) return -1;
    int64_t at = 0;  /* each bag's first id in values */
    int bad = 0;
    for (int64_t i = 0; i < bags; i++) {
        first[i] = at;
        at += lengths[i];
        bad |= lengths[i] < 0;
    }
    if (bad || at != n_values) {
        if (first != stack) free(first);
        return -1;
    }
#pragma omp parallel for schedule(static) num_threads(num_threads) if (bags >= 512)
    for (int64_t i = 0; i < bags; i++) {
        const int64_t f = i / B, b = i % B;
        float *o = out + (b * F + f) * D;
        memset(o, 0, D * sizeof(float));
        if (base[f] < 0) continue;
        const int64_t *ids = values + first[i];
        for (int64_t k = 0; k < lengths[i]; k++) {
            const int64_t local = ids[k] - start[f];
            if (local < 0 || local >= count[f]) continue;
            const int64_t r = (base[f] + local) * D;
            int64_t d = 0;
            for (; d + 8 <= D; d += 8) *(v8 *)(o + d) += load8(rows, r + d, wtype);
            for (; d < D; d++) o[d] += load1(rows, r + d, wtype);
        }
    }
    if (first != stack) free(first);
    return 0;
}
