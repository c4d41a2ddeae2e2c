"""C source of the single-token decode helpers (``engine/decode_kernels.py`` builds and loads it).

Two entry points, fp32, single-threaded (a decode step's glue is tiny; the matrices have their own kernels):

- ``dk_rms_norm``: ``y[r] = w * (x[r] * (1 / sqrt(mean(x[r]^2) + eps)))`` per row, the mean accumulated
  in double (torch sums in fp32 in another order: equal within fp32 rounding);
- ``dk_attend_one``: the attention core of one new token per sequence: optional per-head q/k RMSNorm,
  rotate-half RoPE on the first ``R`` dims (the same two products and one sum per element as
  ``blocks.apply_rope``; compiled with ``-ffp-contract=off``, so bit-identical), the new k/v written
  into the ``[g, max_len, D]`` cache at ``pos``, then per kv head softmax(scale · K q) V over positions
  ``0..pos`` for its ``h/g`` query heads (each K and V row read once per kv head).

Knows nothing about torch or models: pointers, sizes and strides in elements.
"""

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int dk_abi(void) { return 1; }

static float rms_inv(const float *x, int64_t n, float eps) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) acc += (double)x[i] * (double)x[i];
    return 1.0f / sqrtf((float)(acc / (double)n) + eps);
}

void dk_rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        const float inv = rms_inv(xr, n, eps);
        for (int64_t i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* One head vector: optional RMSNorm (weight w, NULL = none), then rotate-half RoPE on dims 0..R. */
static void norm_rope(const float *x, const float *w, float eps, const float *cs, const float *sn,
                      int64_t D, int64_t R, float *out) {
    float tmp[1024];
    const float *src = x;
    if (w) {
        const float inv = rms_inv(x, D, eps);
        for (int64_t i = 0; i < D; i++) tmp[i] = w[i] * (x[i] * inv);
        src = tmp;
    }
    const int64_t half = R / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = src[i] * cs[i], b = (-src[i + half]) * sn[i];
        out[i] = a + b;
    }
    for (int64_t i = half; i < R; i++) {
        const float a = src[i] * cs[i], b = src[i - half] * sn[i];
        out[i] = a + b;
    }
    for (int64_t i = R; i < D; i++) out[i] = src[i];
}

/* The attention sums may use FMA (their order differs from torch's anyway); the norm and RoPE above
   keep separate products and sums (-ffp-contract=off) to match torch bit for bit. */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

__attribute__((optimize("fp-contract=fast")))
static float dot(const float *a, const float *b, int64_t n) {
    v8 acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 += load8(a + i) * load8(b + i);
        acc1 += load8(a + i + 8) * load8(b + i + 8);
    }
    for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(b + i);
    v8 acc = acc0 + acc1;
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* o[i] += p * v[i], i < n */
__attribute__((optimize("fp-contract=fast")))
static void axpy(float *o, float p, const float *v, int64_t n) {
    const v8 pv = {p, p, p, p, p, p, p, p};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(o + i, load8(o + i) + pv * load8(v + i));
    for (; i < n; i++) o[i] += p * v[i];
}

/* q [B, h, D], k/v [B, g, D] (rows of q/k/v may have their own batch strides), kc/vc caches [B, g, L, D]
   (batch stride cb, head stride L*D), out [B, h, D] contiguous. Returns 0, or 1 when D > 1024 or malloc fails. */
int dk_attend_one(const float *q, int64_t qb, const float *k, int64_t kb, const float *v, int64_t vb,
                  const float *qw, const float *kw, float eps, const float *cs, const float *sn, int64_t R,
                  float *kc, float *vc, int64_t cb, int64_t L, int64_t pos,
                  int64_t B, int64_t h, int64_t g, int64_t D, float scale, float *out) {
    if (D > 1024) return 1;
    const int64_t S = pos + 1, r = h / g;
    float *qr = malloc(sizeof(float) * (size_t)(r * D + r * S));
    if (!qr) return 1;
    float *p = qr + r * D;
    for (int64_t bi = 0; bi < B; bi++) {
        float *kcb = kc + bi * cb, *vcb = vc + bi * cb;
        for (int64_t j = 0; j < g; j++) {
            norm_rope(k + bi * kb + j * D, kw, eps, cs, sn, D, R, kcb + (j * L + pos) * D);
            memcpy(vcb + (j * L + pos) * D, v + bi * vb + j * D, sizeof(float) * (size_t)D);
        }
        for (int64_t j = 0; j < g; j++) {
            const float *K = kcb + j * L * D, *V = vcb + j * L * D;
            for (int64_t t = 0; t < r; t++) norm_rope(q + bi * qb + (j * r + t) * D, qw, eps, cs, sn, D, R, qr + t * D);
            for (int64_t s = 0; s < S; s++)
                for (int64_t t = 0; t < r; t++) p[t * S + s] = dot(qr + t * D, K + s * D, D) * scale;
            for (int64_t t = 0; t < r; t++) {
                float *pt = p + t * S, m = pt[0], sum = 0.0f;
                for (int64_t s = 1; s < S; s++) m = pt[s] > m ? pt[s] : m;
                for (int64_t s = 0; s < S; s++) { pt[s] = expf(pt[s] - m); sum += pt[s]; }
                const float inv = 1.0f / sum;
                for (int64_t s = 0; s < S; s++) pt[s] *= inv;
            }
            float *o = out + (bi * h + j * r) * D;
            memset(o, 0, sizeof(float) * (size_t)(r * D));
            for (int64_t s = 0; s < S; s++) {
                const float *vs = V + s * D;
                for (int64_t t = 0; t < r; t++) axpy(o + t * D, p[t * S + s], vs, D);
            }
        }
    }
    free(qr);
    return 0;
}
"""
