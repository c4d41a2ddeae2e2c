"""C source of the native nested-expert kernels (built and loaded by ``engine/native_kernels.py``).

Kept apart so the Python module stays small; the descriptor layout (``D_*`` fields, ``MAXP``,
``P_STRIDE``) must match ``native_kernels``, which checks ``nq_abi()`` after loading. The
int8-activation path is spliced in from ``native_int8_src.py``.
"""
from moestream.engine.dense_kernels_src import QUANTIZE_BLOCK32_C
from moestream.engine.native_int8_src import INT8_PATH_C

C_SOURCE = r"""/* Nested-level expert GEMM straight from packed bit planes (moestream engine/native_kernels.py).
 *
 * Y[M, N] = X[M, K] @ Ŵᵀ where Ŵ is one level of a matryoshka / matryoshka_floor / residual
 * projection, read from its stored arrays (pack_bits planes, per-group scales and zeros).
 * Every ŵ is formed with the codec's own fp32 operations (so it equals torch_decode bit for bit);
 * only the order of the sum over K differs from F.linear.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NQ_AVX2 1
#else
#define NQ_AVX2 0
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pack_bits streams are little-endian words; this kernel assumes a little-endian host"
#endif

#define MAXP 8
enum { D_N, D_K, D_GS, D_KIND, D_NP, D_SHIFT, D_CAP, D_CENTRE, D_SF32, D_ZBUF, D_ZOFF, D_SBUF, D_SOFF, D_PLANES };
#define P_STRIDE 5 /* per plane: codes buffer, codes offset, bits, scale buffer, scale offset */
#define D_STRIDE (D_PLANES + P_STRIDE * MAXP)
enum { KIND_FLOOR = 0, KIND_ROUND = 1, KIND_RESIDUAL = 2 };
#define PAR_MIN_WORK (1 << 17) /* weight x token products below which one thread runs a projection */

typedef struct {
    int64_t N, K, gs, G, kind, np, shift, cap, centre, sf32;
    const uint8_t *zero;
    const uint8_t *scale;
    const uint8_t *codes[MAXP];
    int bits[MAXP];
    const uint8_t *pscale[MAXP];
} proj_t;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, ex = (h >> 10) & 0x1fu, man = h & 0x3ffu, b;
    if (ex == 0) {
        if (man == 0) {
            b = sign;
        } else {
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            b = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (ex == 31) {
        b = sign | 0x7f800000u | (man << 13);
    } else {
        b = sign | ((ex + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline float scale_at(const uint8_t *base, int64_t i, int64_t sf32) {
    if (sf32) { float f; memcpy(&f, base + 4 * i, 4); return f; }
    uint16_t h; memcpy(&h, base + 2 * i, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    return half_to_float(h);
#endif
}

/* value idx of a pack_bits stream: runs of 8 values in `bits` bytes, value i of a run at bit bits*i */
static inline uint32_t code_at(const uint8_t *plane, int bits, int64_t idx) {
    uint64_t w = 0;
    memcpy(&w, plane + (idx >> 3) * bits, (size_t)bits);
    return (uint32_t)((w >> ((idx & 7) * bits)) & ((1u << bits) - 1u));
}

static int parse(const int64_t *d, const int64_t *bases, proj_t *p) {
    p->N = d[D_N]; p->K = d[D_K]; p->gs = d[D_GS]; p->kind = d[D_KIND]; p->np = d[D_NP];
    p->shift = d[D_SHIFT]; p->cap = d[D_CAP]; p->centre = d[D_CENTRE]; p->sf32 = d[D_SF32];
    if (p->N <= 0 || p->K <= 0 || p->gs <= 0 || p->gs % 8 || p->K % p->gs) return 1;
    if (p->np < 1 || p->np > MAXP || p->kind < 0 || p->kind > 2) return 2;
    p->G = p->K / p->gs;
    p->zero = (const uint8_t *)(intptr_t)(bases[d[D_ZBUF]] + d[D_ZOFF]);
    p->scale = (const uint8_t *)(intptr_t)(bases[d[D_SBUF]] + d[D_SOFF]);
    for (int j = 0; j < p->np; j++) {
        const int64_t *q = d + D_PLANES + P_STRIDE * j;
        p->codes[j] = (const uint8_t *)(intptr_t)(bases[q[0]] + q[1]);
        p->bits[j] = (int)q[2];
        if (p->bits[j] < 1 || p->bits[j] > 8) return 3;
        p->pscale[j] = q[3] >= 0 ? (const uint8_t *)(intptr_t)(bases[q[3]] + q[4]) : NULL;
        if (p->kind == KIND_RESIDUAL && j > 0 && (p->bits[j] != 1 || p->pscale[j] == NULL)) return 4;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------- portable path */
static void rows_scalar(const proj_t *p, const float *X, int64_t M, float *Y, int64_t n0, int64_t n1) {
    enum { MBS = 8 };
    const int64_t K = p->K, gs = p->gs, G = p->G;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += MBS) {
            const int64_t mb = M - m0 < MBS ? M - m0 : MBS;
            float acc[MBS] = {0};
            for (int64_t g = 0; g < G; g++) {
                const int64_t ng = n * G + g;
                const float a = scale_at(p->scale, ng, p->sf32);
                const int32_t z = p->zero[ng];
                float ps[MAXP];
                if (p->kind == KIND_RESIDUAL)
                    for (int j = 1; j < p->np; j++) ps[j] = scale_at(p->pscale[j], ng, p->sf32);
                for (int64_t k = g * gs; k < (g + 1) * gs; k++) {
                    const int64_t idx = n * K + k;
                    float w;
                    if (p->kind == KIND_RESIDUAL) {
                        w = ((float)code_at(p->codes[0], p->bits[0], idx) - (float)z) * a;
                        for (int j = 1; j < p->np; j++) w = w + (code_at(p->codes[j], 1, idx) ? ps[j] : -ps[j]);
                    } else {
                        int32_t q = 0;
                        for (int j = 0; j < p->np; j++) q = (q << p->bits[j]) | (int32_t)code_at(p->codes[j], p->bits[j], idx);
                        if (p->kind == KIND_ROUND) { q = (q + 1) >> 1; if (q > p->cap) q = (int32_t)p->cap; }
                        w = (float)((q << p->shift) + (int32_t)p->centre - z) * a;
                    }
                    for (int64_t m = 0; m < mb; m++) acc[m] += w * X[(m0 + m) * K + k];
                }
            }
            for (int64_t m = 0; m < mb; m++) Y[(m0 + m) * p->N + n] = acc[m];
        }
    }
}

#if NQ_AVX2
/* ---------------------------------------------------------------------------------- AVX2 path */
static inline __attribute__((always_inline)) __m256i unpack8(const uint8_t *row, int64_t c, int bits) {
    switch (bits) {
    case 1:
        return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(row[c]), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                _mm256_set1_epi32(1));
    case 2: {
        uint16_t w; memcpy(&w, row + 2 * c, 2);
        return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                _mm256_set1_epi32(3));
    }
    case 3: {
        const uint8_t *b = row + 3 * c;
        const uint32_t w = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16);
        return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)),
                                _mm256_set1_epi32(7));
    }
    case 4: {
        uint32_t w; memcpy(&w, row + 4 * c, 4);
        return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                _mm256_set1_epi32(15));
    }
    case 8:
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8 * c)));
    default: {
        uint64_t w = 0;
        memcpy(&w, row + (int64_t)bits * c, (size_t)bits);
        const uint32_t mk = (1u << bits) - 1u;
        return _mm256_setr_epi32((int)(w & mk), (int)((w >> bits) & mk), (int)((w >> 2 * bits) & mk),
                                 (int)((w >> 3 * bits) & mk), (int)((w >> 4 * bits) & mk), (int)((w >> 5 * bits) & mk),
                                 (int)((w >> 6 * bits) & mk), (int)((w >> 7 * bits) & mk));
    }
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One output row n for MB tokens. KIND/NP/B0..B2 >= 0 are compile-time specialisations; -1 reads them
 * from the descriptor. UNR independent accumulator chains hide the FMA latency. */
static inline __attribute__((always_inline)) void row_avx2(const proj_t *p, int64_t n, const float *X, int64_t ldx,
                                                           float *Y, int64_t ldy, const int MB, const int UNR,
                                                           const int KIND_, const int NP_, const int B0, const int B1,
                                                           const int B2) {
    const int kind = KIND_ >= 0 ? KIND_ : (int)p->kind;
    const int np = NP_ >= 0 ? NP_ : (int)p->np;
    const int64_t K = p->K, G = p->G, cpg = p->gs / 8;
    const uint8_t *rows[MAXP];
    int bits[MAXP];
    for (int j = 0; j < np; j++) {
        bits[j] = (j == 0 && B0 > 0) ? B0 : (j == 1 && B1 > 0) ? B1 : (j == 2 && B2 > 0) ? B2 : p->bits[j];
        rows[j] = p->codes[j] + n * K / 8 * bits[j];
    }
    __m256 acc[4][8];
    for (int u = 0; u < UNR; u++)
        for (int m = 0; m < MB; m++) acc[u][m] = _mm256_setzero_ps();
    const __m128i shv = _mm_cvtsi32_si128((int)p->shift);
    const __m256i capv = _mm256_set1_epi32((int)p->cap), one = _mm256_set1_epi32(1);
    for (int64_t g = 0; g < G; g++) {
        const int64_t ng = n * G + g;
        const __m256 av = _mm256_set1_ps(scale_at(p->scale, ng, p->sf32));
        const __m256i offv = _mm256_set1_epi32((int)p->centre - (int)p->zero[ng]);
        const __m256 zf = _mm256_set1_ps((float)p->zero[ng]);
        __m256 ps[MAXP];
        if (kind == KIND_RESIDUAL)
            for (int j = 1; j < np; j++) ps[j] = _mm256_set1_ps(scale_at(p->pscale[j], ng, p->sf32));
        int64_t c = g * cpg;
        const int64_t cend = c + cpg;
#define NQ_WEIGHTS(W, CC)                                                                                   \
        do {                                                                                                \
            __m256i q_ = unpack8(rows[0], (CC), bits[0]);                                                   \
            if (kind == KIND_RESIDUAL) {                                                                    \
                W = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q_), zf), av);                           \
                for (int j = 1; j < np; j++) {                                                              \
                    const __m256i s_ = _mm256_slli_epi32(_mm256_andnot_si256(unpack8(rows[j], (CC), 1), one), 31); \
                    W = _mm256_add_ps(W, _mm256_xor_ps(ps[j], _mm256_castsi256_ps(s_)));                     \
                }                                                                                           \
            } else {                                                                                        \
                for (int j = 1; j < np; j++)                                                                \
                    q_ = _mm256_or_si256(_mm256_sll_epi32(q_, _mm_cvtsi32_si128(bits[j])), unpack8(rows[j], (CC), bits[j])); \
                if (kind == KIND_ROUND) q_ = _mm256_min_epi32(_mm256_srli_epi32(_mm256_add_epi32(q_, one), 1), capv); \
                W = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_sll_epi32(q_, shv), offv)), av);  \
            }                                                                                               \
        } while (0)
        for (; c + UNR <= cend; c += UNR) {
            for (int u = 0; u < UNR; u++) {
                __m256 w;
                NQ_WEIGHTS(w, c + u);
                for (int m = 0; m < MB; m++)
                    acc[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + m * ldx + (c + u) * 8), acc[u][m]);
            }
        }
        for (; c < cend; c++) {
            __m256 w;
            NQ_WEIGHTS(w, c);
            for (int m = 0; m < MB; m++) acc[0][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + m * ldx + c * 8), acc[0][m]);
        }
#undef NQ_WEIGHTS
    }
    for (int m = 0; m < MB; m++) {
        __m256 s = acc[0][m];
        for (int u = 1; u < UNR; u++) s = _mm256_add_ps(s, acc[u][m]);
        Y[m * ldy + n] = hsum(s);
    }
}

typedef void (*row_fn)(const proj_t *, int64_t, const float *, int64_t, float *, int64_t);

/* One row function specialised per stored configuration: NAME[i] handles 1 / 2 / 4 / 8 tokens. */
#define NQ_SPECIALIZE(ROW, NAME, KIND_, NP_, B0, B1, B2)                                                        \
    static void NAME##_1(const proj_t *p, int64_t n, const float *X, int64_t ldx, float *Y, int64_t ldy) {       \
        ROW(p, n, X, ldx, Y, ldy, 1, 4, KIND_, NP_, B0, B1, B2); }                                               \
    static void NAME##_2(const proj_t *p, int64_t n, const float *X, int64_t ldx, float *Y, int64_t ldy) {       \
        ROW(p, n, X, ldx, Y, ldy, 2, 2, KIND_, NP_, B0, B1, B2); }                                               \
    static void NAME##_4(const proj_t *p, int64_t n, const float *X, int64_t ldx, float *Y, int64_t ldy) {       \
        ROW(p, n, X, ldx, Y, ldy, 4, 1, KIND_, NP_, B0, B1, B2); }                                               \
    static void NAME##_8(const proj_t *p, int64_t n, const float *X, int64_t ldx, float *Y, int64_t ldy) {       \
        ROW(p, n, X, ldx, Y, ldy, 8, 1, KIND_, NP_, B0, B1, B2); }                                               \
    static const row_fn NAME[4] = {NAME##_1, NAME##_2, NAME##_4, NAME##_8};

/* the stored configurations of the default codecs (kind, planes, plane bits), in config_index order;
 * anything else takes the generic specialisation (read from the descriptor) */
#define NQ_CONFIGS(X, ROW, P)                                                                                    \
    X(ROW, P##floor_2, KIND_FLOOR, 1, 2, 0, 0)                                                                  \
    X(ROW, P##floor_22, KIND_FLOOR, 2, 2, 2, 0)                                                                 \
    X(ROW, P##floor_224, KIND_FLOOR, 3, 2, 2, 4)                                                                \
    X(ROW, P##round_3, KIND_ROUND, 1, 3, 0, 0)                                                                  \
    X(ROW, P##round_32, KIND_ROUND, 2, 3, 2, 0)                                                                 \
    X(ROW, P##floor_323, KIND_FLOOR, 3, 3, 2, 3)                                                                \
    X(ROW, P##resid_2, KIND_RESIDUAL, 1, 2, 0, 0)                                                               \
    X(ROW, P##resid_21, KIND_RESIDUAL, 2, 2, 1, 0)                                                              \
    X(ROW, P##resid_211, KIND_RESIDUAL, 3, 2, 1, 1)                                                             \
    X(ROW, P##generic, -1, -1, -1, -1, -1)
#define NQ_N_CONFIGS 10
#define NQ_TABLE_ENTRY(ROW, NAME, KIND_, NP_, B0, B1, B2) NAME,

/* index of p's configuration in NQ_CONFIGS (the last one, generic, when none matches); a floor level's
 * shift is 8 − its bits, which the blocked specialisations derive at compile time, so it is checked */
static int config_index(const proj_t *p) {
    static const int cfg[NQ_N_CONFIGS - 1][5] = {{KIND_FLOOR, 1, 2, 0, 0}, {KIND_FLOOR, 2, 2, 2, 0},
        {KIND_FLOOR, 3, 2, 2, 4}, {KIND_ROUND, 1, 3, 0, 0}, {KIND_ROUND, 2, 3, 2, 0}, {KIND_FLOOR, 3, 3, 2, 3},
        {KIND_RESIDUAL, 1, 2, 0, 0}, {KIND_RESIDUAL, 2, 2, 1, 0}, {KIND_RESIDUAL, 3, 2, 1, 1}};
    const int np = (int)p->np, b[3] = {p->bits[0], np > 1 ? p->bits[1] : 0, np > 2 ? p->bits[2] : 0};
    int total = 0;
    for (int j = 0; j < np; j++) total += p->bits[j];
    for (int i = 0; i < NQ_N_CONFIGS - 1; i++) {
        const int *c = cfg[i];
        if (c[0] == p->kind && c[1] == np && c[2] == b[0] && c[3] == b[1] && c[4] == b[2] &&
            (p->kind != KIND_FLOOR || p->shift == 8 - total))
            return i;
    }
    return NQ_N_CONFIGS - 1;
}

NQ_CONFIGS(NQ_SPECIALIZE, row_avx2, )
static const row_fn *const NATURAL_ROWS[NQ_N_CONFIGS] = {NQ_CONFIGS(NQ_TABLE_ENTRY, row_avx2, )};

static const row_fn *pick_rows(const proj_t *p) { return NATURAL_ROWS[config_index(p)]; }

/* ------------------------------------------------------------------ AVX2 blocked path (the fast one)
 * A block is 64 consecutive codes of a row; lane l of a vector holds codes 8l..8l+7 (b bytes of each
 * plane), so step s = 0..7 extracts code 8l+s of every lane with one shift and one mask, and meets the
 * activations permuted the same way (XP[blk*64 + 8s + l] = X[blk*64 + 8l + s], see permute64).
 * Needs group size % 64 == 0, f16 scales (residual: ŵ = fma(q1, s1, -s1·z1) is then exact) and planes
 * of 1, 2, 3, 4 or 8 bits; anything else takes the natural-order path above. */
static inline __attribute__((always_inline)) __m256i shr_any(__m256i v, const int n) {
    return n >= 0 ? _mm256_srli_epi32(v, n) : _mm256_slli_epi32(v, -n);
}

/* plane lanes of one block: lo holds lane l's codes (bits 8 lo = codes 8l..8l+3, hi = 8l+4..8l+7) */
static inline __attribute__((always_inline)) void load_block(const uint8_t *b, const int bits, const int tail,
                                                             __m256i *lo, __m256i *hi) {
    switch (bits) {
    case 1: *lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b)); break;
    case 2: *lo = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)b)); break;
    case 3: {
        uint8_t tmp[32];
        const uint8_t *src = b;
        if (tail) { memcpy(tmp, b, 24); memset(tmp + 24, 0, 8); src = tmp; } /* never read past the plane */
        const __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)src)),
                                                    _mm_loadu_si128((const __m128i *)(src + 12)), 1);
        *lo = _mm256_shuffle_epi8(raw, _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                                         0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
        break;
    }
    case 4: *lo = _mm256_loadu_si256((const __m256i *)b); break;
    default: { /* 8 */
        const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        const __m256i a = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)b), idx);
        const __m256i c = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(b + 32)), idx);
        *lo = _mm256_permute2x128_si256(a, c, 0x20);
        *hi = _mm256_permute2x128_si256(a, c, 0x31);
    }
    }
}

/* code s of every lane, placed at bit `pos` (masked to `bits` bits) */
static inline __attribute__((always_inline)) __m256i code_s(__m256i lo, __m256i hi, const int bits, const int s,
                                                            const int pos) {
    const int at = bits == 8 ? 8 * (s & 3) : bits * s;
    const __m256i v = (bits == 8 && s >= 4) ? hi : lo;
    return _mm256_and_si256(shr_any(v, at - pos), _mm256_set1_epi32((int)(((1u << bits) - 1u) << pos)));
}

static inline __attribute__((always_inline)) void row_blk(const proj_t *p, int64_t n, const float *XP, int64_t ldx,
                                                          float *Y, int64_t ldy, const int MB, const int UNR,
                                                          const int KIND_, const int NP_, const int B0, const int B1,
                                                          const int B2) {
    const int kind = KIND_ >= 0 ? KIND_ : (int)p->kind;
    const int np = NP_ >= 0 ? NP_ : (int)p->np;
    const int64_t K = p->K, G = p->G, bpg = p->gs / 64, nblk = K / 64;
    const uint8_t *rows[MAXP];
    int bits[MAXP], pos[MAXP];
    for (int j = 0; j < np; j++) {
        bits[j] = (j == 0 && B0 > 0) ? B0 : (j == 1 && B1 > 0) ? B1 : (j == 2 && B2 > 0) ? B2 : p->bits[j];
        rows[j] = p->codes[j] + n * K / 8 * bits[j];
    }
    /* where plane j's bits sit in the combined code (floor: already shifted into m) */
    int below = 0;
    for (int j = np - 1; j >= 0; j--) { pos[j] = below; below += bits[j]; }
    const int shift = (kind == KIND_FLOOR && KIND_ >= 0) ? 8 - below : (int)p->shift;
    const int last_row = n == p->N - 1;
    __m256 tot[8], acc[8][8];
    for (int m = 0; m < MB; m++) tot[m] = _mm256_setzero_ps();
    const __m256i capv = _mm256_set1_epi32((int)p->cap), one = _mm256_set1_epi32(1);
    for (int64_t g = 0; g < G; g++) {
        const int64_t ng = n * G + g;
        const float a = scale_at(p->scale, ng, 0);
        /* uniform: Σ ŵx = α·Σ (m + offset)·x, the integer m + offset exact in fp32 (one α per group);
         * residual: ŵ = fma(q1, s1, -s1·z1) (exact), then ± s_k per plane as the codec adds them */
        const __m256i offv = _mm256_set1_epi32((int)p->centre - (int)p->zero[ng]);
        const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(-a * (float)p->zero[ng]);
        __m256 ps[MAXP];
        if (kind == KIND_RESIDUAL)
            for (int j = 1; j < np; j++) ps[j] = _mm256_set1_ps(scale_at(p->pscale[j], ng, 0));
        /* planes of <= 2 bits are looked up (vpermilps on the code's low bits) instead of converted:
         * floor: the exact integer (v << at) + offset for plane 0, v << at for the others;
         * residual: (v - z1)·s1 for the base (the decode's own fp32 ops), ∓s_k for sign planes */
        __m256 tab[MAXP];
        for (int j = 0; j < np; j++) {
            if (bits[j] > 2 || kind == KIND_ROUND) continue;
            float t[4];
            for (int v = 0; v < 4; v++) {
                const int c = v & ((1 << bits[j]) - 1);
                if (kind == KIND_FLOOR)
                    t[v] = (float)((c << (pos[j] + shift)) + (j == 0 ? (int)p->centre - (int)p->zero[ng] : 0));
                else if (j == 0)
                    t[v] = ((float)c - (float)p->zero[ng]) * a;
                else
                    t[v] = c ? _mm256_cvtss_f32(ps[j]) : -_mm256_cvtss_f32(ps[j]);
            }
            tab[j] = _mm256_setr_ps(t[0], t[1], t[2], t[3], t[0], t[1], t[2], t[3]);
        }
        for (int u = 0; u < UNR; u++)
            for (int m = 0; m < MB; m++) acc[u][m] = _mm256_setzero_ps();
        for (int64_t blk = g * bpg; blk < (g + 1) * bpg; blk++) {
            __m256i lo[MAXP], hi[MAXP];
            lo[0] = hi[0] = _mm256_setzero_si256();
            for (int j = 0; j < np; j++) {
                hi[j] = lo[j] = _mm256_setzero_si256();
                load_block(rows[j] + blk * 8 * bits[j], bits[j], last_row && blk == nblk - 1, &lo[j], &hi[j]);
            }
            const float *xb = XP + blk * 64;
#pragma GCC unroll 8
            for (int s = 0; s < 8; s++) {
                __m256 w;
                if (kind == KIND_RESIDUAL) {
                    w = bits[0] <= 2 ? _mm256_permutevar_ps(tab[0], shr_any(lo[0], bits[0] * s))
                                     : _mm256_fmadd_ps(_mm256_cvtepi32_ps(code_s(lo[0], hi[0], bits[0], s, 0)), av, bv);
                    for (int j = 1; j < np; j++) /* bit 1: +s_k, bit 0: -s_k */
                        w = _mm256_add_ps(w, _mm256_permutevar_ps(tab[j], shr_any(lo[j], s)));
                } else if (kind == KIND_FLOOR && bits[0] <= 2) {
                    w = _mm256_permutevar_ps(tab[0], shr_any(lo[0], bits[0] * s));
                    __m256i mi = _mm256_setzero_si256();
                    int ints = 0;
                    for (int j = 1; j < np; j++) {
                        if (bits[j] <= 2) {
                            w = _mm256_add_ps(w, _mm256_permutevar_ps(tab[j], shr_any(lo[j], bits[j] * s)));
                        } else {
                            mi = _mm256_or_si256(mi, code_s(lo[j], hi[j], bits[j], s, pos[j] + shift));
                            ints = 1;
                        }
                    }
                    if (ints) w = _mm256_add_ps(w, _mm256_cvtepi32_ps(mi));
                } else if (kind == KIND_FLOOR) {
                    __m256i m = code_s(lo[0], hi[0], bits[0], s, pos[0] + shift);
                    for (int j = 1; j < np; j++) m = _mm256_or_si256(m, code_s(lo[j], hi[j], bits[j], s, pos[j] + shift));
                    w = _mm256_cvtepi32_ps(_mm256_add_epi32(m, offv));
                } else {
                    __m256i q = code_s(lo[0], hi[0], bits[0], s, pos[0]);
                    for (int j = 1; j < np; j++) q = _mm256_or_si256(q, code_s(lo[j], hi[j], bits[j], s, pos[j]));
                    q = _mm256_min_epi32(_mm256_srli_epi32(_mm256_add_epi32(q, one), 1), capv);
                    w = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_sll_epi32(q, _mm_cvtsi32_si128(shift)), offv));
                }
                for (int m = 0; m < MB; m++)
                    acc[s % UNR][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + m * ldx + 8 * s), acc[s % UNR][m]);
            }
        }
        for (int m = 0; m < MB; m++) {
            __m256 t = acc[0][m];
            for (int u = 1; u < UNR; u++) t = _mm256_add_ps(t, acc[u][m]);
            tot[m] = kind == KIND_RESIDUAL ? _mm256_add_ps(tot[m], t) : _mm256_fmadd_ps(t, av, tot[m]);
        }
    }
    for (int m = 0; m < MB; m++) Y[m * ldy + n] = hsum(tot[m]);
}

NQ_CONFIGS(NQ_SPECIALIZE, row_blk, b)
static const row_fn *const BLOCKED_ROWS[NQ_N_CONFIGS] = {NQ_CONFIGS(NQ_TABLE_ENTRY, row_blk, b)};

static int blocked_ok(const proj_t *p) {
    if (p->gs % 64 || p->sf32) return 0;
    for (int j = 0; j < p->np; j++)
        if (p->bits[j] > 4 && p->bits[j] != 8) return 0;
    return 1;
}

static const row_fn *pick_blk(const proj_t *p) { return BLOCKED_ROWS[config_index(p)]; }

/* XP[m, blk*64 + 8s + l] = X[m, blk*64 + 8l + s] */
static void permute64(const float *X, int64_t M, int64_t K, float *XP) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K; b += 64)
            for (int s = 0; s < 8; s++)
                for (int l = 0; l < 8; l++) XP[m * K + b + 8 * s + l] = X[m * K + b + 8 * l + s];
}

static void rows_with(const row_fn *f, const proj_t *p, const float *X, int64_t M, float *Y, int64_t n0, int64_t n1) {
    const int64_t K = p->K, N = p->N;
    for (int64_t n = n0; n < n1; n++) {
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) f[3](p, n, X + m * K, K, Y + m * N, N);
        if (M - m >= 4) { f[2](p, n, X + m * K, K, Y + m * N, N); m += 4; }
        if (M - m >= 2) { f[1](p, n, X + m * K, K, Y + m * N, N); m += 2; }
        if (M - m >= 1) f[0](p, n, X + m * K, K, Y + m * N, N);
    }
}
#endif

#if NQ_AVX2
/*@QUANTIZE_BLOCK32@*/

/*@INT8_PATH@*/
#endif

/* 1: int8 activations where i8_ok (set by nq_set_act; the Python side picks by measurement) */
static int g_act_int8 = 0;
int nq_set_act(int int8) { g_act_int8 = int8 ? 1 : 0; return NQ_AVX2; }

static int use_i8(const proj_t *p) {
#if NQ_AVX2
    return g_act_int8 && i8_ok(p);
#else
    (void)p;
    return 0;
#endif
}

/* rows n0..n1 of Y; Xp is X permuted by permute64 when the blocked path applies (else unused) */
static void rows_any(const proj_t *p, const float *X, const float *Xp, int64_t M, float *Y, int64_t n0, int64_t n1) {
#if NQ_AVX2
    if (Xp != NULL) rows_with(pick_blk(p), p, Xp, M, Y, n0, n1);
    else rows_with(pick_rows(p), p, X, M, Y, n0, n1);
#else
    (void)Xp;
    rows_scalar(p, X, M, Y, n0, n1);
#endif
}

/* Y = X @ Ŵᵀ; Xp: X already permuted for this K (or NULL: permuted here when the blocked path applies) */
static int run_proj(const proj_t *p, const float *X, const float *Xp, int64_t M, float *Y, int nthreads) {
    float *own = NULL;
#if NQ_AVX2
    if (blocked_ok(p)) {
        if (Xp == NULL) {
            own = (float *)malloc((size_t)(M * p->K) * sizeof(float));
            if (own == NULL) return 6;
            permute64(X, M, p->K, own);
            Xp = own;
        }
    } else {
        Xp = NULL;
    }
#else
    Xp = NULL;
#endif
#ifdef _OPENMP
    if (nthreads > 1 && p->N * p->K * M >= PAR_MIN_WORK && p->N >= 16 * nthreads) {
#pragma omp parallel num_threads(nthreads)
        {
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t chunk = (p->N / nt + 7) / 8 * 8;
            const int64_t n0 = t * chunk, n1 = t == nt - 1 ? p->N : (t + 1) * chunk;
            if (n0 < n1 && n0 < p->N) rows_any(p, X, Xp, M, Y, n0, n1 < p->N ? n1 : p->N);
        }
        free(own);
        return 0;
    }
#endif
    (void)nthreads;
    rows_any(p, X, Xp, M, Y, 0, p->N);
    free(own);
    return 0;
}

/* per-thread scratch, grown on demand and kept: no allocation per call in steady decode */
static _Thread_local void *g_scratch[2];
static _Thread_local size_t g_scratch_cap[2];

static void *scratch(int which, size_t bytes) {
    if (bytes > g_scratch_cap[which]) {
        void *p = realloc(g_scratch[which], bytes);
        if (p == NULL) return NULL;
        g_scratch[which] = p;
        g_scratch_cap[which] = bytes;
    }
    return g_scratch[which];
}

#if NQ_AVX2
/* int8 SwiGLU expert; xq: X already quantized (or NULL). gate/up/SwiGLU hidden in scratch slot 0. */
static int ffn_i8(const proj_t *gate, const proj_t *up, const proj_t *down, const float *X, const actq_t *xq,
                  int64_t M, float *Y, int nthreads) {
    const int64_t I = gate->N, H = gate->K;
    float *gx = (float *)scratch(0, (size_t)(2 * M * I) * sizeof(float));
    if (gx == NULL) return 6;
    float *ux = gx + M * I;
    actq_t a;
    if (xq == NULL) {
        if (actq_make(X, M, H, &a)) return 6;
        xq = &a;
    }
    run_i8(gate, xq, M, gx, nthreads);
    run_i8(up, xq, M, ux, nthreads);
    for (int64_t i = 0; i < M * I; i++) {
        const float g = gx[i];
        gx[i] = g / (1.0f + expf(-g)) * ux[i];
    }
    actq_t h;
    if (actq_make(gx, M, I, &h)) return 6;
    run_i8(down, &h, M, Y, nthreads);
    return 0;
}
#endif

/* ---------------------------------------------------------------------------------- exported */
int nq_abi(void) { return 100 * D_STRIDE + 10 * MAXP + NQ_AVX2; }

/* the portable loop, whatever this build's SIMD (tests run it on AVX2 machines too) */
int nq_linear_portable(const int64_t *desc, const int64_t *bases, const float *X, int64_t M, float *Y) {
    proj_t p;
    const int err = parse(desc, bases, &p);
    if (err) return err;
    rows_scalar(&p, X, M, Y, 0, p.N);
    return 0;
}

int nq_linear(const int64_t *desc, const int64_t *bases, const float *X, int64_t M, float *Y, int nthreads) {
    proj_t p;
    const int err = parse(desc, bases, &p);
    if (err) return err;
#if NQ_AVX2
    if (use_i8(&p)) {
        actq_t a;
        if (actq_make(X, M, p.K, &a)) return 6;
        run_i8(&p, &a, M, Y, nthreads);
        return 0;
    }
#endif
    return run_proj(&p, X, NULL, M, Y, nthreads);
}

/* SwiGLU expert: Y[M, H] = down(silu(gate X) * up X) for X [M, H]. */
int nq_ffn(const int64_t *desc, const int64_t *bases, const float *X, int64_t M, float *Y, int nthreads) {
    proj_t gate, up, down;
    int err = parse(desc, bases, &gate);
    if (!err) err = parse(desc + D_STRIDE, bases, &up);
    if (!err) err = parse(desc + 2 * D_STRIDE, bases, &down);
    if (err) return err;
    const int64_t I = gate.N, H = gate.K;
    if (up.N != I || up.K != H || down.N != H || down.K != I) return 5;
    float *work = (float *)malloc((size_t)(M * (2 * I + H)) * sizeof(float));
    if (work == NULL) return 6;
    float *gx = work, *ux = work + M * I, *xp = NULL;
#if NQ_AVX2
    if (use_i8(&gate) && use_i8(&up) && use_i8(&down)) {
        free(work);
        return ffn_i8(&gate, &up, &down, X, NULL, M, Y, nthreads);
    }
    if (blocked_ok(&gate) && blocked_ok(&up)) { /* permute X once for both */
        xp = work + 2 * M * I;
        permute64(X, M, H, xp);
    }
#endif
    err = run_proj(&gate, X, xp, M, gx, nthreads);
    if (!err) err = run_proj(&up, X, xp, M, ux, nthreads);
    if (!err) {
        for (int64_t i = 0; i < M * I; i++) {
            const float g = gx[i];
            gx[i] = g / (1.0f + expf(-g)) * ux[i];
        }
        err = run_proj(&down, gx, NULL, M, Y, nthreads);
    }
    free(work);
    return err;
}

/* Y[M, H] = Σ_e w[e·M + m] · ffn_e(X)[m] over E experts; descs [E][3][D_STRIDE], bases [E][MAXP].
 * One call per MoE layer and token group: the int8 path quantizes X once for every expert. */
int nq_moe(const int64_t *descs, const int64_t *bases, const float *w, int64_t E, const float *X, int64_t M,
           float *Y, int nthreads) {
    if (E <= 0 || M <= 0) return E < 0 || M < 0 ? 5 : 0;
    proj_t p[3];
    int err = 0;
    for (int j = 0; j < 3 && !err; j++) err = parse(descs + j * D_STRIDE, bases, &p[j]);
    if (err) return err;
    const int64_t H = p[0].K;
    float *tmp = (float *)malloc((size_t)(M * H) * sizeof(float));
    if (tmp == NULL) return 6;
    memset(Y, 0, (size_t)(M * H) * sizeof(float));
#if NQ_AVX2
    actq_t xq;
    int have_xq = 0;
#endif
    for (int64_t e = 0; e < E && !err; e++) {
        const int64_t *d = descs + e * 3 * D_STRIDE, *b = bases + e * MAXP;
        for (int j = 0; j < 3 && !err; j++) err = parse(d + j * D_STRIDE, b, &p[j]);
        if (err) break;
        if (p[0].K != H || p[1].K != H || p[2].N != H || p[1].N != p[0].N || p[2].K != p[0].N) { err = 5; break; }
#if NQ_AVX2
        if (use_i8(&p[0]) && use_i8(&p[1]) && use_i8(&p[2])) {
            if (!have_xq) {
                /* keep X's quantization in its own buffer: ffn_i8 reuses scratch slot 1 for the hidden */
                void *mem = malloc(actq_bytes(M, H));
                if (mem == NULL) { err = 6; break; }
                actq_fill(X, M, H, mem, &xq);
                have_xq = 1;
            }
            err = ffn_i8(&p[0], &p[1], &p[2], X, &xq, M, tmp, nthreads);
        } else
#endif
        {
            err = nq_ffn(d, b, X, M, tmp, nthreads);
        }
        if (err) break;
        const float *we = w + e * M;
        for (int64_t m = 0; m < M; m++) {
            const float s = we[m];
            float *y = Y + m * H;
            const float *t = tmp + m * H;
            for (int64_t h = 0; h < H; h++) y[h] += s * t[h];
        }
    }
#if NQ_AVX2
    if (have_xq) free(xq.mem);
#endif
    free(tmp);
    return err;
}
"""

C_SOURCE = C_SOURCE.replace("/*@QUANTIZE_BLOCK32@*/", QUANTIZE_BLOCK32_C).replace("/*@INT8_PATH@*/", INT8_PATH_C)
