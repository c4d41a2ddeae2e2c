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
 * the block dot products in exact integers (AVX2 maddubs with llama.cpp's sign trick), one fp32 fma
 * per block with dw·dx.
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

static inline __m256i weights_block(const int kind, const uint8_t *qs, int64_t blk) {
    if (kind == KIND_Q8_0) return _mm256_loadu_si256((const __m256i *)(qs + blk * QK));
    const __m128i b = _mm_loadu_si128((const __m128i *)(qs + blk * 16));
    const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
    return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
}

static inline __m256 block_dot(__m256i ax, __m256i w, __m256i xq) {
    const __m256i p16 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(xq, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* rows n0..n1 of Y for all M tokens; tokens in tiles of up to 4 share each weight block */
static void rows(const int kind, const uint8_t *qs, const float *dw, int64_t K, const int8_t *XQ, const float *DX,
                 int64_t M, float *Y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t nb = K / QK, rb = kind == KIND_Q8_0 ? K : K / 2;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = qs + n * rb;
        const float *dr = dw + n * nb;
        if (M == 1) { /* decode: four chains over the blocks hide the fma latency */
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            int64_t b = 0;
            for (; b + 4 <= nb; b += 4) {
                for (int u = 0; u < 4; u++) {
                    const __m256i w = weights_block(kind, wr, b + u);
                    const __m256 f = block_dot(_mm256_sign_epi8(w, w), w,
                                               _mm256_loadu_si256((const __m256i *)(XQ + (b + u) * QK)));
                    acc[u] = _mm256_fmadd_ps(f, _mm256_set1_ps(dr[b + u] * DX[b + u]), acc[u]);
                }
            }
            for (; b < nb; b++) {
                const __m256i w = weights_block(kind, wr, b);
                const __m256 f = block_dot(_mm256_sign_epi8(w, w), w, _mm256_loadu_si256((const __m256i *)(XQ + b * QK)));
                acc[0] = _mm256_fmadd_ps(f, _mm256_set1_ps(dr[b] * DX[b]), acc[0]);
            }
            Y[n] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mb = M - m0 < 4 ? (int)(M - m0) : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t b = 0; b < nb; b++) {
                const __m256i w = weights_block(kind, wr, b);
                const __m256i ax = _mm256_sign_epi8(w, w);
                for (int t = 0; t < mb; t++) {
                    const int64_t m = m0 + t;
                    const __m256 f = block_dot(ax, w, _mm256_loadu_si256((const __m256i *)(XQ + m * K + b * QK)));
                    acc[t] = _mm256_fmadd_ps(f, _mm256_set1_ps(dr[b] * DX[m * nb + b]), acc[t]);
                }
            }
            for (int t = 0; t < mb; t++) Y[(m0 + t) * N + n] = hsum(acc[t]);
        }
    }
}

int dq_linear(int kind, const void *qs, const float *dw, int64_t N, int64_t K, const float *X, int64_t M, float *Y,
              int nthreads) {
    if ((kind != KIND_Q8_0 && kind != KIND_Q4_0) || K % QK || N <= 0 || M < 0) return 1;
    if (M == 0) return 0;
    int8_t *XQ = (int8_t *)malloc((size_t)(M * K) + (size_t)(M * (K / QK)) * sizeof(float) + 64);
    if (XQ == NULL) return 6;
    float *DX = (float *)(XQ + ((M * K + 63) / 64) * 64);
    for (int64_t m = 0; m < M; m++) quantize_row(X + m * K, K, XQ + m * K, DX + m * (K / QK));
#ifdef _OPENMP
    if (nthreads > 1 && N * K * M >= PAR_MIN_WORK && N >= 16 * nthreads) {
#pragma omp parallel num_threads(nthreads)
        {
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t chunk = (N + nt - 1) / nt;
            const int64_t n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
            if (n0 < n1) rows(kind, (const uint8_t *)qs, dw, K, XQ, DX, M, Y, N, n0, n1);
        }
        free(XQ);
        return 0;
    }
#endif
    (void)nthreads;
    rows(kind, (const uint8_t *)qs, dw, K, XQ, DX, M, Y, N, 0, N);
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
