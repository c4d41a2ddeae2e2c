"""C source of the nested kernels' int8-activation path (spliced into ``native_kernels_src.C_SOURCE``).

Owns the activation quantizer (one int8 scale per 128 inputs, in the two orders the plane loads
need), the tile kernel (several output rows x several tokens per call, integer dot products) and
``run_i8``. Uses ``proj_t``, ``scale_at``, ``hsum`` and ``MAXP`` from the enclosing source; knows
nothing about descriptors, files or Python.
"""

INT8_PATH_C = r"""/* ------------------------------------------------------------------ int8-activation path (AVX2)
 * Activations are quantized per 128-chunk c of K with one scale d = max|x| / 127 (like llama.cpp's
 * Q8_K, which uses 256), round half to even. The codes are stored twice, as four 32-byte blocks
 * each, in the orders in which one load of a plane yields its codes, so weights are never shuffled:
 *   order A (2-bit planes): block s = x[128c + 4j + s], j = 0..31 (byte j of a 2-bit plane holds codes 4j..4j+3);
 *   order B (4-bit planes): blocks x[128c + 2j], x[128c + 2j + 1], x[128c + 64 + 2j], x[128c + 65 + 2j]
 *                           (byte j holds codes 2j, 2j+1 in its low and high nibble).
 * A level's code q = Σ_j p_j·2^pos_j is split into terms of at most 4 bits: runs of up to two 2-bit
 * planes (order A) and single 4-bit planes (order B), so every maddubs operand is 0..15 and the
 * chunk's four blocks sum in int16 (|Σ| ≤ 4·2·15·127 < 2^15); one madd by the term's 2^(pos + shift)
 * widens it. Floor levels, per chunk:
 *   Σ_k ŵ_k x̂_k = α·d·(T + (centre − z)·Σ_k x_k),  T = Σ_k q_k·2^shift·x_k = Σ_terms 2^(pos + shift)·Σ p·x,
 * T an exact integer (< 2^22); α·d (one fp32 product per row, chunk and token) and the zero-point part
 * (integer (centre − z)·Σx, exact) are computed for 8 chunks of a row at once, so a chunk costs its
 * integer dots, one convert and one FMA. A tile is R rows × MB tokens with R·MB fp32 accumulators;
 * the R rows' sums are reduced together (hadd).
 * Needs floor kind, planes of 2 or 4 bits (≤ 8 in all), group size % 128 == 0. */
static int i8_ok(const proj_t *p) {
    if (p->kind != KIND_FLOOR || p->gs % 128) return 0;
    int tot = 0;
    for (int j = 0; j < p->np; j++) {
        if (p->bits[j] != 2 && p->bits[j] != 4) return 0;
        tot += p->bits[j];
    }
    return tot <= 8 && p->shift == 8 - tot;
}

/* quantized activations [M, K]: codes in order A and B (M·K bytes each), per-chunk scales d and
 * code sums sq (ncp = K/128 rounded up to 8 per token, zero padded: 8 chunks are read at once) */
typedef struct { int8_t *qa, *qb; float *d; int32_t *sq; int64_t ncp; void *mem; } actq_t;

static int64_t actq_ncp(int64_t K) { return (K / 128 + 7) / 8 * 8; }

static size_t actq_bytes(int64_t M, int64_t K) {
    return (size_t)(2 * M * K + 64) + (size_t)(2 * M * actq_ncp(K)) * 4;
}

/* one 128-chunk: d = max|x| / 127, codes round-half-even(x · (1/d)) clamped to ±127 (0 when d == 0),
 * written in order A (qa) and B (qb); returns Σ codes */
static int32_t quantize_chunk128(const float *x, int8_t *qa, int8_t *qb, float *d) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 16; i++) mx = _mm256_max_ps(mx, _mm256_andnot_ps(signbit, _mm256_loadu_ps(x + 8 * i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float db = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 idv = _mm256_set1_ps(db > 0.0f ? 1.0f / db : 0.0f);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i nat[4], isum = _mm256_setzero_si256();
    for (int g = 0; g < 4; g++) { /* nat[g]: codes of x[32g .. 32g + 31] in natural order */
        __m256i w[4];
        for (int i = 0; i < 4; i++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * g + 8 * i), idv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            w[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
            isum = _mm256_add_epi32(isum, w[i]);
        }
        const __m256i p01 = _mm256_packs_epi32(w[0], w[1]), p23 = _mm256_packs_epi32(w[2], w[3]);
        nat[g] = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    }
    /* order A: group each lane's bytes by s (4x4 transpose), then qword s of P[g] is block s's part g */
    const __m256i by_s = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                          0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m256i P[4];
    for (int g = 0; g < 4; g++)
        P[g] = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(nat[g], by_s), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    const __m256i t0 = _mm256_unpacklo_epi64(P[0], P[1]), t1 = _mm256_unpackhi_epi64(P[0], P[1]);
    const __m256i t2 = _mm256_unpacklo_epi64(P[2], P[3]), t3 = _mm256_unpackhi_epi64(P[2], P[3]);
    _mm256_storeu_si256((__m256i *)qa, _mm256_permute2x128_si256(t0, t2, 0x20));
    _mm256_storeu_si256((__m256i *)(qa + 32), _mm256_permute2x128_si256(t1, t3, 0x20));
    _mm256_storeu_si256((__m256i *)(qa + 64), _mm256_permute2x128_si256(t0, t2, 0x31));
    _mm256_storeu_si256((__m256i *)(qa + 96), _mm256_permute2x128_si256(t1, t3, 0x31));
    /* order B: even bytes then odd bytes per lane, then gather the halves of each 64 */
    const __m256i eo = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int h = 0; h < 2; h++) {
        const __m256i a = _mm256_shuffle_epi8(nat[2 * h], eo), b = _mm256_shuffle_epi8(nat[2 * h + 1], eo);
        _mm256_storeu_si256((__m256i *)(qb + 64 * h), _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(a, b), 0xd8));
        _mm256_storeu_si256((__m256i *)(qb + 64 * h + 32), _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(a, b), 0xd8));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *d = db;
    return _mm_cvtsi128_si32(s4);
}

/* X [M, K] quantized into mem (actq_bytes(M, K) bytes) */
static void actq_fill(const float *X, int64_t M, int64_t K, void *mem, actq_t *a) {
    const int64_t nc = K / 128, ncp = actq_ncp(K);
    a->mem = mem;
    a->ncp = ncp;
    a->qa = (int8_t *)mem;
    a->qb = a->qa + M * K;
    a->d = (float *)(((uintptr_t)(a->qb + M * K) + 63) & ~(uintptr_t)63);
    a->sq = (int32_t *)(a->d + M * ncp);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t c = 0; c < nc; c++)
            a->sq[m * ncp + c] = quantize_chunk128(X + m * K + 128 * c, a->qa + m * K + 128 * c, a->qb + m * K + 128 * c,
                                                   a->d + m * ncp + c);
        for (int64_t c = nc; c < ncp; c++) { a->d[m * ncp + c] = 0.0f; a->sq[m * ncp + c] = 0; }
    }
}

static void *scratch(int which, size_t bytes);

/* activations quantized into per-thread scratch slot 1 (valid until the next actq_make on this thread) */
static int actq_make(const float *X, int64_t M, int64_t K, actq_t *a) {
    void *mem = scratch(1, actq_bytes(M, K));
    if (mem == NULL) return 6;
    actq_fill(X, M, K, mem, a);
    return 0;
}

/* a term of a level's code: one 2-bit plane or two (order A; the first at bits 2-3), or one 4-bit plane (order B) */
enum { TERM_A1 = 0, TERM_A2 = 1, TERM_B = 2 };

/* the four blocks of a term's codes in 128-chunk c (each byte 0..15) */
static inline __attribute__((always_inline)) void term_codes(const uint8_t *r0, const uint8_t *r1, const int kind,
                                                             int64_t c, __m256i q[4]) {
    const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15);
    if (kind == TERM_B) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(r0 + 64 * c));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(r0 + 64 * c + 32));
        q[0] = _mm256_and_si256(a, m15);
        q[1] = _mm256_and_si256(_mm256_srli_epi16(a, 4), m15);
        q[2] = _mm256_and_si256(b, m15);
        q[3] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m15);
    } else if (kind == TERM_A1) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(r0 + 32 * c));
        q[0] = _mm256_and_si256(a, m3);
        q[1] = _mm256_and_si256(_mm256_srli_epi16(a, 2), m3);
        q[2] = _mm256_and_si256(_mm256_srli_epi16(a, 4), m3);
        q[3] = _mm256_and_si256(_mm256_srli_epi16(a, 6), m3);
    } else { /* u: codes s = 0, 2 of both planes as nibbles (first plane above); v: s = 1, 3 */
        const __m256i a = _mm256_loadu_si256((const __m256i *)(r0 + 32 * c));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(r1 + 32 * c));
        const __m256i m33 = _mm256_set1_epi8(0x33), mcc = _mm256_set1_epi8((char)0xcc);
        const __m256i u = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(a, m33), 2), _mm256_and_si256(b, m33));
        const __m256i v = _mm256_or_si256(_mm256_and_si256(a, mcc), _mm256_srli_epi16(_mm256_and_si256(b, mcc), 2));
        q[0] = _mm256_and_si256(u, m15);
        q[1] = _mm256_and_si256(v, m15);
        q[2] = _mm256_and_si256(_mm256_srli_epi16(u, 4), m15);
        q[3] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
    }
}

/* Σ_s maddubs(q[s], x block s) in int16 (exact: codes ≤ 15), widened by mult */
static inline __attribute__((always_inline)) __m256i term_dot(const __m256i q[4], const int8_t *x, __m256i mult) {
    __m256i s = _mm256_maddubs_epi16(q[0], _mm256_loadu_si256((const __m256i *)x));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q[1], _mm256_loadu_si256((const __m256i *)(x + 32))));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q[2], _mm256_loadu_si256((const __m256i *)(x + 64))));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q[3], _mm256_loadu_si256((const __m256i *)(x + 96))));
    return _mm256_madd_epi16(s, mult);
}

#define MAXT 4 /* terms of a level (planes of 2 or 4 bits, ≤ 8 bits in all) */
typedef struct {
    int nt, kind[MAXT], j0[MAXT], j1[MAXT], mult[MAXT];
} terms_t;

/* the terms of p's planes (plane 0 most significant); mult = 2^(bit position + shift) */
static void make_terms(const proj_t *p, terms_t *t) {
    int below = 0;
    for (int j = 0; j < p->np; j++) below += p->bits[j];
    t->nt = 0;
    for (int j = 0; j < p->np;) {
        const int k = t->nt++;
        t->j0[k] = j;
        t->j1[k] = -1;
        below -= p->bits[j];
        if (p->bits[j] == 4) {
            t->kind[k] = TERM_B;
            j += 1;
        } else if (j + 1 < p->np && p->bits[j + 1] == 2) {
            t->kind[k] = TERM_A2;
            t->j1[k] = j + 1;
            below -= 2;
            j += 2;
        } else {
            t->kind[k] = TERM_A1;
            j += 1;
        }
        t->mult[k] = 1 << (below + (int)p->shift);
    }
}

/* α for chunks cb..cb+7 of row n (lanes past the row: anything) and centre − z as int32 */
static inline __attribute__((always_inline)) void row_scales(const proj_t *p, int64_t n, int64_t cb, __m256 *al,
                                                             __m256i *off) {
    const int64_t G = p->G, cpg = p->gs / 128, nc = p->K / 128, at = n * G + cb;
    if (cpg == 1 && at + 8 <= p->N * G) { /* 8 groups from this row on, all inside the arrays */
        *al = p->sf32 ? _mm256_loadu_ps((const float *)p->scale + at)
                      : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p->scale + 2 * at)));
        *off = _mm256_sub_epi32(_mm256_set1_epi32((int)p->centre),
                                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p->zero + at))));
        return;
    }
    float a[8] = {0};
    int32_t o[8] = {0};
    for (int i = 0; i < 8 && cb + i < nc; i++) {
        const int64_t ng = n * G + (cb + i) / cpg;
        a[i] = scale_at(p->scale, ng, p->sf32);
        o[i] = (int32_t)p->centre - (int32_t)p->zero[ng];
    }
    *al = _mm256_loadu_ps(a);
    *off = _mm256_loadu_si256((const __m256i *)o);
}

/* rows n..n+R-1, tokens m0..m0+MB-1 of Y (all of K). NT_ > 0, T0..T2 >= 0: the terms at compile time */
static inline __attribute__((always_inline)) void tile_i8(const proj_t *p, const terms_t *tm, int64_t n,
                                                          const actq_t *a, int64_t m0, const int R, const int MB,
                                                          float *Y, int64_t ldy, const int NT_, const int T0,
                                                          const int T1, const int T2) {
    const int64_t K = p->K, nc = K / 128, ncp = a->ncp;
    const int nt = NT_ > 0 ? NT_ : tm->nt;
    int kind[MAXT];
    const uint8_t *r0[MAXT][4], *r1[MAXT][4];
    __m256i mult[MAXT];
    for (int k = 0; k < nt; k++) {
        kind[k] = (k == 0 && T0 >= 0) ? T0 : (k == 1 && T1 >= 0) ? T1 : (k == 2 && T2 >= 0) ? T2 : tm->kind[k];
        const int64_t row_bytes = K / 8 * (kind[k] == TERM_B ? 4 : 2);
        mult[k] = _mm256_set1_epi16((short)tm->mult[k]);
        for (int r = 0; r < R; r++) {
            r0[k][r] = p->codes[tm->j0[k]] + (n + r) * row_bytes;
            r1[k][r] = kind[k] == TERM_A2 ? p->codes[tm->j1[k]] + (n + r) * row_bytes : NULL;
        }
    }
    __m256 acc[4][8];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) { /* row by row (x stays a memory operand), reduced together below */
#pragma GCC unroll 8
        for (int t = 0; t < MB; t++) acc[r][t] = _mm256_setzero_ps();
        for (int64_t cb = 0; cb < nc; cb += 8) {
            float coef[8][8];
            __m256 al;
            __m256i off;
            row_scales(p, n + r, cb, &al, &off);
#pragma GCC unroll 8
            for (int t = 0; t < MB; t++) { /* coefficients α·d, and the zero-point part α·d·(centre − z)·Σx at once */
                const int64_t at = (m0 + t) * ncp + cb;
                const __m256 cf = _mm256_mul_ps(al, _mm256_loadu_ps(a->d + at)); /* 0 past the last chunk */
                _mm256_storeu_ps(coef[t], cf);
                const __m256i zt = _mm256_mullo_epi32(off, _mm256_loadu_si256((const __m256i *)(a->sq + at)));
                acc[r][t] = _mm256_fmadd_ps(cf, _mm256_cvtepi32_ps(zt), acc[r][t]);
            }
            const int64_t ce = cb + 8 < nc ? cb + 8 : nc;
            for (int64_t c = cb; c < ce; c++) {
                __m256i s[8];
#pragma GCC unroll 4
                for (int k = 0; k < nt; k++) {
                    __m256i q[4];
                    term_codes(r0[k][r], r1[k][r], kind[k], c, q);
                    const int8_t *xk = (kind[k] == TERM_B ? a->qb : a->qa) + m0 * K + 128 * c;
#pragma GCC unroll 8
                    for (int t = 0; t < MB; t++) {
                        const __m256i d = term_dot(q, xk + t * K, mult[k]);
                        s[t] = k == 0 ? d : _mm256_add_epi32(s[t], d);
                    }
                }
#pragma GCC unroll 8
                for (int t = 0; t < MB; t++)
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_broadcast_ss(&coef[t][c - cb]), acc[r][t]);
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < MB; t++) {
        float *y = Y + (m0 + t) * ldy + n;
        if (R == 4) {
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][t], acc[1][t]), _mm256_hadd_ps(acc[2][t], acc[3][t]));
            _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        } else if (R == 2) {
            const __m256 h = _mm256_hadd_ps(acc[0][t], acc[1][t]);
            const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storel_pi((__m64 *)y, _mm_hadd_ps(s, s));
        } else {
            y[0] = hsum(acc[0][t]);
        }
    }
}

/* rows n0..n1 of Y = X̂ @ Ŵᵀ for all M tokens, in groups of 4 rows: decode (one token) takes 4 rows
 * at once; prefill takes 1 row × 8 tokens (one-term levels) or 2 rows × 4 tokens (two terms: register
 * budget); smaller tiles at the edges (measured on Zen 3, bench/native_gemv.py) */
static inline __attribute__((always_inline)) void rows_i8(const proj_t *p, const actq_t *a, int64_t M, float *Y,
                                                          int64_t n0, int64_t n1, const int NT_, const int T0,
                                                          const int T1, const int T2) {
    terms_t tm;
    make_terms(p, &tm);
    const int64_t N = p->N;
    const int one_term = (NT_ > 0 ? NT_ : tm.nt) == 1;
#define NQ_TILE(NN, MM, R, MB) tile_i8(p, &tm, NN, a, MM, R, MB, Y, N, NT_, T0, T1, T2)
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        int64_t m = 0;
        if (one_term)
            for (; m + 8 <= M; m += 8)
                for (int r = 0; r < 4; r++) NQ_TILE(n + r, m, 1, 8);
        for (; m + 4 <= M; m += 4)
            for (int r = 0; r < 4; r += 2) NQ_TILE(n + r, m, 2, 4);
        for (; m + 2 <= M; m += 2)
            for (int r = 0; r < 4; r += 2) NQ_TILE(n + r, m, 2, 2);
        for (; m < M; m++) NQ_TILE(n, m, 4, 1);
    }
    for (; n < n1; n++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) NQ_TILE(n, m, 1, 4);
        for (; m < M; m++) NQ_TILE(n, m, 1, 1);
    }
#undef NQ_TILE
}

typedef void (*rows_i8_fn)(const proj_t *, const actq_t *, int64_t, float *, int64_t, int64_t);
#define NQ_I8(NAME, NT_, T0, T1, T2)                                                                            \
    static void NAME(const proj_t *p, const actq_t *a, int64_t M, float *Y, int64_t n0, int64_t n1) {           \
        rows_i8(p, a, M, Y, n0, n1, NT_, T0, T1, T2); }
NQ_I8(i8_2, 1, TERM_A1, -1, -1)
NQ_I8(i8_22, 1, TERM_A2, -1, -1)
NQ_I8(i8_224, 2, TERM_A2, TERM_B, -1)
NQ_I8(i8_4, 1, TERM_B, -1, -1)
NQ_I8(i8_44, 2, TERM_B, TERM_B, -1)
NQ_I8(i8_generic, -1, -1, -1, -1)

static rows_i8_fn pick_i8(const proj_t *p) {
    const int np = (int)p->np, b0 = p->bits[0], b1 = np > 1 ? p->bits[1] : 0, b2 = np > 2 ? p->bits[2] : 0;
    if (np == 1 && b0 == 2) return i8_2;
    if (np == 2 && b0 == 2 && b1 == 2) return i8_22;
    if (np == 3 && b0 == 2 && b1 == 2 && b2 == 4) return i8_224;
    if (np == 1 && b0 == 4) return i8_4;
    if (np == 2 && b0 == 4 && b1 == 4) return i8_44;
    return i8_generic;
}

static void run_i8(const proj_t *p, const actq_t *a, int64_t M, float *Y, int nthreads) {
    const rows_i8_fn f = pick_i8(p);
#ifdef _OPENMP
    if (nthreads > 1 && p->N * p->K * M >= PAR_MIN_WORK && p->N >= 16 * nthreads) {
#pragma omp parallel num_threads(nthreads)
        {
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t chunk = ((p->N + nt - 1) / nt + 3) / 4 * 4;
            const int64_t n0 = t * chunk, n1 = n0 + chunk < p->N ? n0 + chunk : p->N;
            if (n0 < n1) f(p, a, M, Y, n0, n1);
        }
        return;
    }
#endif
    (void)nthreads;
    f(p, a, M, Y, 0, p->N);
}"""
