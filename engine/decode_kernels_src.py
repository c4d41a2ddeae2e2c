"""C source of the single-token decode helpers (``engine/decode_kernels.py`` builds and loads it).

Two entry points, fp32, single-threaded (a decode step's glue is tiny; the matrices have their own kernels):

- ``dk_rms_norm``: ``y[r] = w * (x[r] * (1 / sqrt(mean(x[r]^2) + eps)))`` per row, the mean accumulated
  in double (torch sums in fp32 in another order: equal within fp32 rounding);
- ``dk_prep_one``: what comes between the projections and the attention for one new token per
  sequence: optional per-head q/k RMSNorm, rotate-half RoPE on the first ``R`` dims (the same two
  products and one sum per element as ``blocks.apply_rope``; compiled with ``-ffp-contract=off``, so
  bit-identical), the new k and v written into the ``[g, max_len, D]`` cache at ``pos``, the q rows
  into an output buffer. The attention itself stays with torch's SDPA (vectorized exp and blocked
  products: a plain C loop here was 2x slower per cached position).

Knows nothing about torch or models: pointers, sizes and strides in elements.
"""

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
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

/* q [B, h, D], k/v [B, g, D] (each sequence's rows contiguous; batch strides qb/kb/vb), caches [B, g, L, D]
   (batch stride cb, head stride L*D). Writes the normed + roped q to qo [B, h, D] and the normed + roped k
   and the v into the caches at position pos. Returns 0, or 1 when D > 1024. */
int dk_prep_one(const float *q, int64_t qb, const float *k, int64_t kb, const float *v, int64_t vb,
                const float *qw, const float *kw, float eps, const float *cs, const float *sn, int64_t R,
                float *kc, float *vc, int64_t cb, int64_t L, int64_t pos,
                int64_t B, int64_t h, int64_t g, int64_t D, float *qo) {
    if (D > 1024) return 1;
    for (int64_t bi = 0; bi < B; bi++) {
        float *kcb = kc + bi * cb, *vcb = vc + bi * cb;
        for (int64_t j = 0; j < g; j++) {
            norm_rope(k + bi * kb + j * D, kw, eps, cs, sn, D, R, kcb + (j * L + pos) * D);
            memcpy(vcb + (j * L + pos) * D, v + bi * vb + j * D, sizeof(float) * (size_t)D);
        }
        for (int64_t i = 0; i < h; i++) norm_rope(q + bi * qb + i * D, qw, eps, cs, sn, D, R, qo + (bi * h + i) * D);
    }
    return 0;
}
"""
