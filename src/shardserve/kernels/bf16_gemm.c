/* y = x W^T (+ b) with bfloat16 (or int8) weights on the CPU's own bfloat16 dot products: AMX
 * tiles (Sapphire Rapids and later), or AVX512-BF16's vdpbf16ps where it multiplies at twice
 * float32 FMA's rate (AMD Zen 4 and 5; ops.pair_mode decides from bf16_dp_rate, measured).
 * Both multiply bfloat16 pairs and accumulate in float32, as oneDNN's bf16 GEMM (vLLM's CPU
 * backend) and transformers' bf16 matmul do: the activations are rounded to bfloat16 once per
 * call, the sums stay float32, x and y are float32. (Where neither holds, ops.py keeps
 * bfloat16 on gemm.c's float32 registers: a Sapphire Rapids core without AMX runs one
 * 32-product vdpbf16ps a cycle against two 16-product FMAs.)
 *
 * Weights are packed once at load in pairs along K, the layout both instruction sets read
 * (Intel calls it VNNI): P[q][k/2][j][k%2] = W[q * NR + j][k], panels of NR = 64 output
 * features, K a multiple of 32. One panel row (a K pair of 64 features) is 256 bytes:
 *   - AVX512-BF16: per K pair, 4 vector loads of the panel and one 32-bit broadcast of x's pair
 *     per row feed 4 vdpbf16ps (MR x 64 tile in 24 registers);
 *   - AMX: a B tile is 16 K pairs x 16 features (16 rows of 64 bytes at stride 256), an A tile
 *     16 rows x 32 K of x in bfloat16; one TDPBF16PS is 16 x 16 x 32 multiply-adds. A block of
 *     32 rows x 32 features keeps 2 x 2 C tiles.
 *
 * int8 weights (weight-only quantization, W = scale[o] * P, P in -127..127): bfloat16 holds
 * every integer of that range exactly, so for AMX each panel is widened to bfloat16 once per
 * work item (in L2) and runs the same tiles; vdpbf16ps widens each panel row in registers.
 * On AMX, calls of 16 rows or fewer (decode at small batch: one pass over the weights is the
 * whole cost) widen the int8 to float32 instead and keep x in float32 (f32pair_tile). The
 * scales come in with the bias.
 *
 * Work items: a chunk of up to MC rows against one panel, threads taking items as they finish;
 * the rows of a chunk run one after another against the same panel, which stays in L2.
 *
 *   x (N, K), y (N, O) float32 contiguous; p packed as above (bfloat16 or int8); O % 64 == 0,
 *   K % 32 == 0; bias (O,) or NULL; scale (O,) for int8, else NULL.
 *
 * act = ACT_SILU_MUL fuses a gated MLP's activation into the gate-and-up projection: the
 * weight's output features alternate 32 of the gate and the same 32 of the up projection
 * (ops.interleave_gate_up), so each panel's 64 sums are a gate block and its up block, and
 * y (N, O / 2) gets silu(gate) * up, as elementwise.c's silu_mul computes it: the (N, O)
 * sums are never written nor read back.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vecmath.h"

#define NR 64
#define MC 128
#define MR 6
/* int8 layers called with at most this many rows on an AMX CPU run on float32 registers
 * (f32pair_tile), with float32 activations: widening a whole panel to bfloat16 for the tiles,
 * or pairs for vdpbf16ps at one instruction a cycle, costs more than the float32 FMAs there.
 * Where vdpbf16ps runs at twice the FMAs' rate (mode AVX512_BF16 is chosen only there) it
 * widens pairs faster at every row count (AMD Zen 5: 1.2-1.8x at 1-16 rows). */
#define FEW_I8_ROWS 16
/* Software prefetch this many bytes ahead in a panel streamed from memory (few rows). */
#define PF_AHEAD 4096

enum { MODE_NONE = 0, MODE_AVX512_BF16 = 1, MODE_AMX = 2 };

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define HAVE_AMX 1
#endif

#if defined(__AVX512BF16__)

/* The kernel this build and this process can run: AMX needs the kernel's permission for the
 * tile state (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+), asked once. */
int bf16_gemm_mode(void) {
#if defined(HAVE_AMX)
    static int mode = -1;
    if (mode < 0)
        mode = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                       18 /* XFEATURE_XTILEDATA */) == 0 ? MODE_AMX : MODE_AVX512_BF16;
    return mode;
#else
    return MODE_AVX512_BF16;
#endif
}

/* Products a cycle of vdpbf16ps over those of vfmadd231ps on this core, measured: 16
 * independent sums of each (enough to cover either's latency on two pipes), the shortest of
 * five alternating timings. ~1 on Sapphire Rapids (one 32-product vdpbf16ps a cycle against
 * two 16-product FMAs), ~2 on AMD Zen 4 and 5 (as many vdpbf16ps as FMAs a cycle). */
#define PROBE_CHAINS 16
#define PROBE_STEPS 16384
static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* 16 chains of one instruction (STEP updates acc[c] from the constants a and b), PROBE_STEPS
 * times; the asm keeps the compiler from folding the chains. */
#define DEFINE_PROBE(NAME, AB, A, B, STEP)                                                  \
    __attribute__((noinline)) static float NAME(void) {                                   \
        __m512 acc[PROBE_CHAINS];                                                         \
        const AB a = A, b = B;                                                            \
        for (int c = 0; c < PROBE_CHAINS; c++) acc[c] = _mm512_set1_ps((float)c);         \
        for (int s = 0; s < PROBE_STEPS; s++) {                                           \
            for (int c = 0; c < PROBE_CHAINS; c++) acc[c] = STEP;                         \
            __asm__ __volatile__("" : "+v"(acc[0]), "+v"(acc[5]), "+v"(acc[10]),          \
                                 "+v"(acc[15]));                                          \
        }                                                                                 \
        __m512 sum = acc[0];                                                              \
        for (int c = 1; c < PROBE_CHAINS; c++) sum = _mm512_add_ps(sum, acc[c]);          \
        return _mm512_reduce_add_ps(sum);                                                 \
    }
DEFINE_PROBE(probe_dp, __m512bh,
             _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f)),
             _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f), _mm512_set1_ps(1.0f)),
             _mm512_dpbf16_ps(acc[c], a, b))
DEFINE_PROBE(probe_fma, __m512, _mm512_set1_ps(1e-3f), _mm512_set1_ps(1.0f),
             _mm512_fmadd_ps(a, b, acc[c]))

double bf16_dp_rate(void) {
    double dp = 1e9, fma = 1e9;
    volatile float sink = 0;
    for (int round = 0; round < 5; round++) {
        double t = seconds();
        sink += probe_dp();
        const double t_dp = seconds() - t;
        t = seconds();
        sink += probe_fma();
        const double t_fma = seconds() - t;
        if (t_dp < dp) dp = t_dp;
        if (t_fma < fma) fma = t_fma;
    }
    (void)sink;
    return 2.0 * fma / dp;  /* 32 products an instruction against 16 */
}

/* Rows of x in bfloat16 are XLD(K) apart, one line more than K: an AMX A tile's 16 rows at a
 * stride of 4 KiB (K = 2048) would all fall in one L1 set. */
#define XLD(K) ((K) + 32)

/* Rows [r0, r1) of x as bfloat16 (round to nearest even) into xb, zero rows up to r2. */
static void to_bf16(const float *x, uint16_t *xb, int64_t r0, int64_t r1, int64_t r2, int64_t K) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t k = 0; k < K; k += 32) {
            const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + r * K + k + 16),
                                                   _mm512_loadu_ps(x + r * K + k));
            _mm512_storeu_si512((void *)(xb + r * XLD(K) + k), (__m512i)v);
        }
    if (r2 > r1) memset(xb + r1 * XLD(K), 0, (size_t)((r2 - r1) * XLD(K)) * 2);
}

/* A panel of int8 weights (K * NR) widened to bfloat16: exact for -127..127. */
static void widen_i8(const int8_t *p, uint16_t *out, int64_t K) {
    for (int64_t i = 0; i < K * NR; i += 16) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i *)(p + i))));
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(f));
    }
}

#define ACT_NONE 0
#define ACT_SILU_MUL 1

/* y[rows, 64 features] = acc * scale + bias, from a tile of sums c (ld NR), y's rows O apart;
 * with ACT_SILU_MUL, y[rows, 32] = silu(features 0-31) * features 32-63. */
static inline void store_rows(const float *c, float *y, int64_t O, int rows,
                              const float *bias, const float *scale, int act) {
    for (int i = 0; i < rows; i++) {
        __m512 s[NR / 16];
        for (int v = 0; v < NR / 16; v++) {
            s[v] = _mm512_loadu_ps(c + i * NR + v * 16);
            if (scale) s[v] = _mm512_mul_ps(s[v], _mm512_loadu_ps(scale + v * 16));
            if (bias) s[v] = _mm512_add_ps(s[v], _mm512_loadu_ps(bias + v * 16));
        }
        if (act == ACT_SILU_MUL) {
            _mm512_storeu_ps(y + i * O, (__m512)silu_mulv((vec)s[0], (vec)s[2]));
            _mm512_storeu_ps(y + i * O + 16, (__m512)silu_mulv((vec)s[1], (vec)s[3]));
        } else {
            for (int v = 0; v < NR / 16; v++) _mm512_storeu_ps(y + i * O + v * 16, s[v]);
        }
    }
}

/* A panel row (one K pair of 64 features) as 4 vectors of bfloat16 pairs: loaded as they are,
 * or int8 widened in registers (exact). */
static inline __attribute__((always_inline)) void pair_row(const void *pp, int64_t k2,
                                                           int wtype, __m512bh b[4]) {
    if (wtype == W_I8) {
        const int8_t *row = (const int8_t *)pp + k2 * NR * 2;
        for (int v = 0; v < 4; v++) {
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(row + v * 32))));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(row + v * 32 + 16))));
            b[v] = _mm512_cvtne2ps_pbh(hi, lo);
        }
    } else {
        const uint16_t *row = (const uint16_t *)pp + k2 * NR * 2;
        for (int v = 0; v < 4; v++) b[v] = (__m512bh)_mm512_loadu_si512(row + v * 32);
    }
}

/* AVX512-BF16: rows [m, m + mr) of xb against one panel pp (K/2 x NR pairs), sums into c. */
static inline __attribute__((always_inline)) void dp_tile(int mr, const uint16_t *xb,
                                                          const void *pp, int64_t K,
                                                          float *c, int wtype) {
    const int64_t row_bytes = wtype == W_I8 ? NR * 2 : NR * 4;
    __m512 acc[MR][4];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < 4; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K / 2; k2++) {
        const char *row = (const char *)pp + k2 * row_bytes;
        for (int l = 0; l < row_bytes; l += 64)
            _mm_prefetch(row + PF_AHEAD + l, _MM_HINT_T0);
        __m512bh b[4];
        pair_row(pp, k2, wtype, b);
        for (int i = 0; i < mr; i++) {
            int32_t pair;
            memcpy(&pair, xb + i * XLD(K) + 2 * k2, 4);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < 4; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(c + i * NR + v * 16, acc[i][v]);
}

static inline __attribute__((always_inline)) void rows_dp(
        const uint16_t *xb, const void *pp, int64_t m0, int64_t m1, int64_t K, int64_t O,
        float *y, const float *bias, const float *scale, int wtype, int act) {
    float c[MR * NR] __attribute__((aligned(64)));
    for (int64_t m = m0; m < m1; m += MR) {
        const int mr = m1 - m < MR ? (int)(m1 - m) : MR;
        switch (mr) {  /* a constant row count each, so the tile stays in registers */
        case 1: dp_tile(1, xb + m * XLD(K), pp, K, c, wtype); break;
        case 2: dp_tile(2, xb + m * XLD(K), pp, K, c, wtype); break;
        case 3: dp_tile(3, xb + m * XLD(K), pp, K, c, wtype); break;
        case 4: dp_tile(4, xb + m * XLD(K), pp, K, c, wtype); break;
        case 5: dp_tile(5, xb + m * XLD(K), pp, K, c, wtype); break;
        default: dp_tile(6, xb + m * XLD(K), pp, K, c, wtype); break;
        }
        store_rows(c, y + m * O, O, mr, bias, scale, act);
    }
}

static void rows_dp_bf16(const uint16_t *xb, const void *pp, int64_t m0, int64_t m1,
                         int64_t K, int64_t O, float *y, const float *bias, const float *scale,
                         int act) {
    rows_dp(xb, pp, m0, m1, K, O, y, bias, scale, W_BF16, act);
}

static void rows_dp_i8(const uint16_t *xb, const void *pp, int64_t m0, int64_t m1,
                       int64_t K, int64_t O, float *y, const float *bias, const float *scale,
                       int act) {
    rows_dp(xb, pp, m0, m1, K, O, y, bias, scale, W_I8, act);
}

/* int8 pair panels at few rows, on float32 registers (the way gemm.c reads int8 panels):
 * per K pair, the panel row's 128 weights (64 features x 2 of K) widen to 8 vectors of 16
 * floats whose lanes alternate the two K of each feature; x's pair (x[k], x[k+1]), float32,
 * broadcast as one 64-bit pattern; one FMA per 16 weights and row into 8 accumulators per row,
 * and at the end each feature's two lanes are added. At one to 16 rows streaming the weights
 * is the whole cost, and this widens them with fewer instructions than vdpbf16ps's bfloat16
 * pairs (int8 -> float32 only). x is not rounded to bfloat16 here. */
static inline __attribute__((always_inline)) void f32pair_tile(int mr, const float *x, int64_t K,
                                                               const int8_t *pp, float *c) {
    __m512 acc[3][8];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < 8; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K / 2; k2++) {
        const int8_t *row = pp + k2 * NR * 2;
        _mm_prefetch((const char *)row + PF_AHEAD, _MM_HINT_T0);
        _mm_prefetch((const char *)row + PF_AHEAD + 64, _MM_HINT_T0);
        __m512 a[3];
        for (int i = 0; i < mr; i++) {
            double pair;
            memcpy(&pair, x + i * K + 2 * k2, 8);
            a[i] = _mm512_castpd_ps(_mm512_set1_pd(pair));
        }
        for (int v = 0; v < 8; v++) {
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(row + v * 16))));
            for (int i = 0; i < mr; i++) acc[i][v] = _mm512_fmadd_ps(a[i], w, acc[i][v]);
        }
    }
    /* lanes (2f, 2f + 1) of acc[v] are feature 8v + f's two halves */
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < 8; v += 2) {
            const __m512 s0 = _mm512_add_ps(acc[i][v], _mm512_permute_ps(acc[i][v], 0xB1));
            const __m512 s1 = _mm512_add_ps(acc[i][v + 1],
                                            _mm512_permute_ps(acc[i][v + 1], 0xB1));
            _mm512_storeu_ps(c + i * NR + v * 8, _mm512_permutex2var_ps(s0, even, s1));
        }
}

static void rows_f32pair_i8(const float *x, const int8_t *pp, int64_t m0, int64_t m1, int64_t K,
                            int64_t O, float *y, const float *bias, const float *scale,
                            int act) {
    float c[3 * NR] __attribute__((aligned(64)));
    for (int64_t m = m0; m < m1; m += 3) {
        const int mr = m1 - m < 3 ? (int)(m1 - m) : 3;
        switch (mr) {  /* a constant row count each, so the tile stays in registers */
        case 1: f32pair_tile(1, x + m * K, K, pp, c); break;
        case 2: f32pair_tile(2, x + m * K, K, pp, c); break;
        default: f32pair_tile(3, x + m * K, K, pp, c); break;
        }
        store_rows(c, y + m * O, O, mr, bias, scale, act);
    }
}

#if defined(HAVE_AMX)
/* Tile configuration: palette 1, every tile 16 rows of 64 bytes (C: 16 x 16 float32; A: 16
 * rows x 32 bfloat16; B: 16 K pairs x 16 features). */
static void tile_config(void) {
    uint8_t cfg[64] __attribute__((aligned(64))) = {0};
    cfg[0] = 1;
    for (int t = 0; t < 8; t++) {
        cfg[16 + 2 * t] = 64;  /* bytes per row (little-endian uint16) */
        cfg[48 + t] = 16;      /* rows */
    }
    /* GCC 12 can drop the stores above where this is inlined (seen in a test program: the
     * intrinsic's read of cfg is invisible to it, and 16 rows of 0 bytes fault) */
    __asm__ __volatile__("" : : "r"(cfg) : "memory");
    _tile_loadconfig(cfg);
}

/* Rows [m0, m1) of xb (zero-padded to whole 16-row tiles) against panel pp; sums via c. */
static void rows_amx(const uint16_t *xb, const uint16_t *pp, int64_t m0, int64_t m1, int64_t K,
                     int64_t O, float *y, const float *bias, const float *scale, int act) {
    float c[32 * NR] __attribute__((aligned(64)));
    const int64_t lda = XLD(K) * 2, ldb = NR * 4;  /* bytes */
    for (int64_t m = m0; m < m1; m += 32) {
        const uint16_t *a = xb + m * XLD(K);
        if (m1 - m > 16) {  /* 32 rows: 2 x 2 C tiles per half panel */
            for (int h = 0; h < 2; h++) {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t k = 0; k < K; k += 32) {
                    const uint16_t *b = pp + k * NR + h * 64;  /* pair row k/2, feature 32h */
                    if (h == 0 && m == m0)  /* the first pass streams the panel: 4 KiB a step */
                        for (int l = 0; l < 4096; l += 64)
                            _mm_prefetch((const char *)(pp + k * NR) + PF_AHEAD + l,
                                         _MM_HINT_T0);
                    _tile_loadd(4, a + k, lda);
                    _tile_loadd(5, a + 16 * XLD(K) + k, lda);
                    _tile_loadd(6, b, ldb);
                    _tile_loadd(7, b + 32, ldb);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, c + h * 32, NR * 4);
                _tile_stored(1, c + h * 32 + 16, NR * 4);
                _tile_stored(2, c + 16 * NR + h * 32, NR * 4);
                _tile_stored(3, c + 16 * NR + h * 32 + 16, NR * 4);
            }
        } else {  /* 16 rows (or fewer, zero-padded): 1 x 4 C tiles over the whole panel */
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t k = 0; k < K; k += 32) {
                const uint16_t *b = pp + k * NR;  /* 4 KiB: 16 pair rows of the panel */
                for (int l = 0; l < 4096; l += 64)
                    _mm_prefetch((const char *)b + PF_AHEAD + l, _MM_HINT_T0);
                _tile_loadd(4, a + k, lda);
                _tile_loadd(5, b, ldb);
                _tile_loadd(6, b + 32, ldb);
                _tile_loadd(7, b + 64, ldb);
                _tile_dpbf16ps(0, 4, 5);
                _tile_dpbf16ps(1, 4, 6);
                _tile_loadd(5, b + 96, ldb);
                _tile_dpbf16ps(2, 4, 7);
                _tile_dpbf16ps(3, 4, 5);
            }
            _tile_stored(0, c, NR * 4);
            _tile_stored(1, c + 16, NR * 4);
            _tile_stored(2, c + 32, NR * 4);
            _tile_stored(3, c + 48, NR * 4);
        }
        const int rows = m1 - m < 32 ? (int)(m1 - m) : 32;
        store_rows(c, y + m * O, O, rows, bias, scale, act);
    }
}
#endif

/* Returns 0, or -1 for a shape, weight type or mode it does not take (the caller falls back).
 * mode: MODE_AMX or MODE_AVX512_BF16 (at most bf16_gemm_mode()); act: ACT_NONE or
 * ACT_SILU_MUL (y is then (N, O / 2)). */
int bf16_gemm(const float *x, const void *p, const float *bias, const float *scale, float *y,
              int64_t N, int64_t K, int64_t O, int num_threads, int wtype, int mode, int act) {
    if (N < 1 || K < 32 || K % 32 || O < NR || O % NR || num_threads < 1
            || (wtype != W_BF16 && wtype != W_I8) || (wtype == W_I8) != (scale != 0)
            || mode < MODE_AVX512_BF16 || mode > bf16_gemm_mode()
            || (act != ACT_NONE && act != ACT_SILU_MUL))
        return -1;
    /* y's row stride and a panel's first output: 64 features, or 32 activations */
    const int64_t OY = act == ACT_SILU_MUL ? O / 2 : O, PY = act == ACT_SILU_MUL ? NR / 2 : NR;
    const int widen = wtype == W_I8, few_i8 = widen && N <= FEW_I8_ROWS && mode == MODE_AMX;
    const int tiles = mode == MODE_AMX && !few_i8;  /* AMX runs this call */
    /* x rounded to bfloat16, zero rows up to whole AMX tiles: all but few_i8 read it */
    const int64_t Np = (N + 15) / 16 * 16;
    uint16_t *xb = few_i8 ? 0 : aligned_alloc(64, (size_t)(Np * XLD(K) * 2 + 64));
    if (!few_i8 && !xb) return -1;
    const int64_t panels = O / NR, chunks = (N + MC - 1) / MC, items = panels * chunks;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (xb)
            to_bf16(x, xb, N * t / nt, N * (t + 1) / nt, t == nt - 1 ? Np : N * (t + 1) / nt,
                    K);
        uint16_t *wide = widen && tiles ? aligned_alloc(64, (size_t)(K * NR * 2)) : 0;
        if (widen && tiles && !wide) {
#pragma omp atomic write
            failed = 1;
        }
#if defined(HAVE_AMX)
        if (tiles) tile_config();
#endif
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
            const int64_t q = it % panels, c = it / panels;
            const int64_t m0 = c * MC, m1 = m0 + MC < N ? m0 + MC : N;
            const float *b = bias ? bias + q * NR : 0, *s = scale ? scale + q * NR : 0;
#if defined(HAVE_AMX)
            if (tiles) {
                const uint16_t *pp = (const uint16_t *)p + q * K * NR;
                if (widen) {
                    widen_i8((const int8_t *)p + q * K * NR, wide, K);
                    pp = wide;
                }
                rows_amx(xb, pp, m0, m1, K, OY, y + q * PY, b, s, act);
                continue;
            }
#endif
            if (few_i8)
                rows_f32pair_i8(x, (const int8_t *)p + q * K * NR, m0, m1, K, OY, y + q * PY, b,
                                s, act);
            else if (widen)
                rows_dp_i8(xb, (const int8_t *)p + q * K * NR, m0, m1, K, OY, y + q * PY, b, s,
                           act);
            else
                rows_dp_bf16(xb, (const uint16_t *)p + q * K * NR, m0, m1, K, OY, y + q * PY, b,
                             s, act);
        }
#if defined(HAVE_AMX)
        if (tiles) _tile_release();
#endif
        free(wide);
    }
    free(xb);
    return failed ? -1 : 0;
}

#else  /* no AVX512-BF16 in this build: ops.py keeps the float32-register kernels */

int bf16_gemm_mode(void) { return MODE_NONE; }

double bf16_dp_rate(void) { return 0.0; }

int bf16_gemm(const float *x, const void *p, const float *bias, const float *scale, float *y,
              int64_t N, int64_t K, int64_t O, int num_threads, int wtype, int mode, int act) {
    (void)x; (void)p; (void)bias; (void)scale; (void)y; (void)N; (void)K; (void)O;
    (void)num_threads; (void)wtype; (void)mode; (void)act;
    return -1;
}

#endif
