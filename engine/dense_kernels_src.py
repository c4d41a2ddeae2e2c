"""C source of the Q8_0 / Q4_0 dense kernels (built and loaded by ``engine/dense_kernels.py``).

Kept apart so the Python module stays small; the layouts are documented there.
``QUANTIZE_BLOCK32_C`` (activation quantization) is shared with ``native_kernels_src.py``.
"""

QUANTIZE_BLOCK32_C = r"""/* Q8_0 activations of 32 floats: d = max|x| / 127, q = round-half-even(x / d) clamped to ±127 (0 when d == 0);
 * returns d. Shared by the dense and the nested kernels (engine/dense_kernels_src.py). */
#ifndef QK
#define QK 32
#endif
static inline float quantize_block32(const float *xb, int8_t *q) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(signbit, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float db = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 idv = _mm256_set1_ps(db > 0.0f ? 1.0f / db : 0.0f);
    __m256i w[4];
    for (int i = 0; i < 4; i++) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
        w[i] = _mm256_cvtps_epi32(r);
    }
    const __m256i p01 = _mm256_packs_epi32(w[0], w[1]), p23 = _mm256_packs_epi32(w[2], w[3]);
    const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p);
    return db;
}
"""

C_SOURCE = r"""/* Dense Q8_0 / Q4_0 GEMM with int8 activations (moestream engine/dense_kernels.py).
 *
 * Y[M, N] = Xq[M, K] @ Wᵀ, X quantized per block of 32 (d = max|x| / 127, q = round-half-even(x / d)),
 * the block dot products in exact integers (AVX2 maddubs: Q8_0 with llama.cpp's sign trick, Q4_0 as
 * maddubs(nibbles, x) minus the per-activation-block term 8·Σx, computed once per token), one fp32 fma
 * per block with dw·dx (formed 8 blocks at a time). Tiles of rows x tokens (see tile); every output is
 * one fp32 chain over its blocks in order, so the result does not depend on the tiling or the threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DQ_AVX2 1
#else
#define DQ_AVX2 0
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32
#define PAR_MIN_WORK (1 << 18)
enum { KIND_Q8_0 = 0, KIND_Q4_0 = 1 };

int dq_abi(void) { return DQ_AVX2; }

#if DQ_AVX2
/*@QUANTIZE_BLOCK32@*/

/* one row of X into int8 codes and block scales (bit-identical to dense_kernels.quantize_activations) */
static void quantize_row(const float *x, int64_t K, int8_t *q, float *d) {
    for (int64_t b = 0; b < K / QK; b++) d[b] = quantize_block32(x + b * QK, q + b * QK);
}

/* the codes of weight block blk: Q8_0 signed int8; Q4_0 unsigned nibbles 0..15 (the -8 is applied through the
 * activations' C16 term, see tile) */
static inline __m256i weights_block(const int kind, const uint8_t *qs, int64_t blk) {
    if (kind == KIND_Q8_0) return _mm256_loadu_si256((const __m256i *)(qs + blk * QK));
    const __m128i b = _mm_loadu_si128((const __m128i *)(qs + blk * 16));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
}

/* Σ over a block of w·x as 8 int32 lanes, exact: Q8_0 by the sign trick, Q4_0 as maddubs(nibbles, x) - 8·(x pairs) */
static inline __m256i block_dot(const int kind, __m256i w, __m256i xq, const int16_t *c16) {
    const __m256i one = _mm256_set1_epi16(1);
    if (kind == KIND_Q8_0)
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w)), one);
    const __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(w, xq), _mm256_loadu_si256((const __m256i *)c16));
    return _mm256_madd_epi16(p16, one);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#define SB 8            /* blocks per scale chunk: dw·dx of SB blocks in one vector multiply */
#define PREFETCH 2048   /* weight bytes read ahead of each row stream (best of 512..4096 measured on Zen 3) */

/* Y[t, n] for R rows n.. and T tokens m..: each output is one fp32 chain over the blocks in order (so any
 * tiling gives the same bits); the tile shares each weight block over T tokens and each activation block
 * over R rows. At M = 1 one row per tile is fastest here: with 2 or 4 interleaved row streams the same
 * arithmetic ran 1.3-1.7x slower cold (the weight reads bound it; one stream plus a software prefetch wins). */
static inline __attribute__((always_inline)) void tile(const int kind, const int R, const int T, const uint8_t *qs,
                                                      const float *dw, int64_t K, const int8_t *XQ, const float *DX,
                                                      const int16_t *C16, float *Y, int64_t N, int64_t n, int64_t m) {
    const int64_t nb = K / QK, bb = kind == KIND_Q8_0 ? QK : QK / 2, rb = nb * bb;
    const uint8_t *wr[2];
    const float *dr[2];
    for (int r = 0; r < R; r++) { wr[r] = qs + (n + r) * rb; dr[r] = dw + (n + r) * nb; }
    __m256 acc[2][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    float s[2][4][SB] __attribute__((aligned(32)));
    for (int64_t b0 = 0; b0 < nb; b0 += SB) {
        const int cnt = nb - b0 < SB ? (int)(nb - b0) : SB;
        if (cnt == SB) {
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++)
                    _mm256_store_ps(s[r][t], _mm256_mul_ps(_mm256_loadu_ps(dr[r] + b0),
                                                           _mm256_loadu_ps(DX + (m + t) * nb + b0)));
        } else {
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++)
                    for (int j = 0; j < cnt; j++) s[r][t][j] = dr[r][b0 + j] * DX[(m + t) * nb + b0 + j];
        }
        for (int r = 0; r < R; r++) /* a prefetch past the matrix's end is a hint, never a fault */
            for (int l = 0; l < SB * bb; l += 64)
                _mm_prefetch((const char *)(wr[r] + b0 * bb + PREFETCH + l), _MM_HINT_T0);
        for (int j = 0; j < cnt; j++) {
            const int64_t b = b0 + j;
            __m256i xq[4];
            for (int t = 0; t < T; t++) xq[t] = _mm256_loadu_si256((const __m256i *)(XQ + (m + t) * K + b * QK));
            for (int r = 0; r < R; r++) {
                const __m256i w = weights_block(kind, wr[r], b);
                for (int t = 0; t < T; t++) {
                    const __m256 f = _mm256_cvtepi32_ps(block_dot(kind, w, xq[t], C16 + ((m + t) * nb + b) * 16));
                    acc[r][t] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(&s[r][t][j]), acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) Y[(m + t) * N + n + r] = hsum(acc[r][t]);
}

/* rows n0..n1 of Y, kind fixed at compile time: one row per tile at M = 1, else 2 rows x 4 tokens with
 * smaller tiles for the remainders */
static inline __attribute__((always_inline)) void rows_of(const int kind, const uint8_t *qs, const float *dw,
                                                         int64_t K, const int8_t *XQ, const float *DX,
                                                         const int16_t *C16, int64_t M, float *Y, int64_t N,
                                                         int64_t n0, int64_t n1) {
    if (M == 1) {
        for (int64_t n = n0; n < n1; n++) tile(kind, 1, 1, qs, dw, K, XQ, DX, C16, Y, N, n, 0);
        return;
    }
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile(kind, 2, 4, qs, dw, K, XQ, DX, C16, Y, N, n, m);
        for (; m < M; m++) tile(kind, 2, 1, qs, dw, K, XQ, DX, C16, Y, N, n, m);
    }
    if (n < n1) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile(kind, 1, 4, qs, dw, K, XQ, DX, C16, Y, N, n, m);
        for (; m < M; m++) tile(kind, 1, 1, qs, dw, K, XQ, DX, C16, Y, N, n, m);
    }
}

static void rows(const int kind, const uint8_t *qs, const float *dw, int64_t K, const int8_t *XQ, const float *DX,
                 const int16_t *C16, int64_t M, float *Y, int64_t N, int64_t n0, int64_t n1) {
    if (kind == KIND_Q8_0) rows_of(KIND_Q8_0, qs, dw, K, XQ, DX, C16, M, Y, N, n0, n1);
    else rows_of(KIND_Q4_0, qs, dw, K, XQ, DX, C16, M, Y, N, n0, n1);
}

/* Q4_0 only: per activation block the 16 int16 pair sums 8·(x[2i] + x[2i+1]) that the -8 offset of the nibbles
 * contributes to maddubs(nibbles, x) */
static void offset_terms(const int8_t *q, int16_t *c) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_set1_epi8(8), _mm256_loadu_si256((const __m256i *)q));
    _mm256_storeu_si256((__m256i *)c, p);
}

int dq_linear(int kind, const void *qs, const float *dw, int64_t N, int64_t K, const float *X, int64_t M, float *Y,
              int nthreads) {
    if ((kind != KIND_Q8_0 && kind != KIND_Q4_0) || K % QK || N <= 0 || M < 0) return 1;
    if (M == 0) return 0;
    const int64_t nbt = M * (K / QK);
    const size_t xq_bytes = (size_t)((M * K + 63) / 64) * 64, dx_bytes = (size_t)((nbt * 4 + 63) / 64) * 64;
    const size_t c_bytes = kind == KIND_Q4_0 ? (size_t)nbt * 32 : 0;
    int8_t *XQ = (int8_t *)malloc(xq_bytes + dx_bytes + c_bytes + 64);
    if (XQ == NULL) return 6;
    float *DX = (float *)(XQ + xq_bytes);
    int16_t *C16 = (int16_t *)(XQ + xq_bytes + dx_bytes);
    for (int64_t m = 0; m < M; m++) quantize_row(X + m * K, K, XQ + m * K, DX + m * (K / QK));
    if (kind == KIND_Q4_0)
        for (int64_t b = 0; b < nbt; b++) offset_terms(XQ + b * QK, C16 + b * 16);
#ifdef _OPENMP
    if (nthreads > 1 && N * K * M >= PAR_MIN_WORK && N >= 16 * nthreads) {
#pragma omp parallel num_threads(nthreads)
        {
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t chunk = (N + nt - 1) / nt;
            const int64_t n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
            if (n0 < n1) rows(kind, (const uint8_t *)qs, dw, K, XQ, DX, C16, M, Y, N, n0, n1);
        }
        free(XQ);
        return 0;
    }
#endif
    (void)nthreads;
    rows(kind, (const uint8_t *)qs, dw, K, XQ, DX, C16, M, Y, N, 0, N);
    free(XQ);
    return 0;
}
#else
int dq_linear(int kind, const void *qs, const float *dw, int64_t N, int64_t K, const float *X, int64_t M, float *Y,
              int nthreads) {
    (void)kind; (void)qs; (void)dw; (void)N; (void)K; (void)X; (void)M; (void)Y; (void)nthreads;
    return 7; /* built without AVX2: dense_kernels.py uses its reference instead */
}
#endif
"""

C_SOURCE = C_SOURCE.replace("/*@QUANTIZE_BLOCK32@*/", QUANTIZE_BLOCK32_C)
