"""Fast, exact group-range search for the matryoshka codecs.

Owns the encoder's hot loop: for every quantization group and every
candidate range [lo, hi] of the matryoshka range search, the activation-
weighted squared error at each compute width, and the per-group choice of
the best candidate. The result is BIT-IDENTICAL to the straightforward
search (``MatryoshkaCodec.search_ranges_reference``):

- the per-element terms ``h·(w − ŵ)²`` are computed with exactly the
  reference's float32/float64 operations (division, round-half-even, clamp,
  float32 dequantization, float64 square), so only the order of the float64
  sums over a group may differ (by at most ~1e-13 relative);
- the native backend folds the objective into the kernel and abandons a
  candidate as soon as its partial objective (a lower bound: every term is
  >= 0) exceeds the best so far by more than the margin, so it can never be
  a contender;
- a group's winner is taken from these sums only when no other candidate
  comes within a safety margin (1e-9 relative) of it; candidates within the
  margin that share the same (scale, zero) have identical exact errors, so
  the first of them wins as in the reference; any other near-tie is settled
  by running the reference search on those groups alone (a search is per
  group, so a subset gives the same answer).

Two backends compute the candidate errors (the choice never changes the
output): ``native`` — a small C kernel compiled once with the system C
compiler (``$CC`` or ``cc``) into a per-user cache and loaded with ctypes,
run on ``torch.get_num_threads()`` threads (its sums follow numpy's pairwise
order for group sizes <= 128, so near-ties are rare); ``torch`` — vectorised
torch ops, used when no compiler is available (or with
``MOESTREAM_CODEC_BACKEND=torch``). Also owns the final int8 codes.

Knows nothing about files, models or the engine; it is handed the codec.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moestream.convert.native_build import compile_library, find_compiler, library_path

if TYPE_CHECKING:  # pragma: no cover
    from moestream.convert.codecs.matryoshka import MatryoshkaCodec

log = logging.getLogger(__name__)

#: Relative margin within which two candidates' objectives count as a near-tie.
REL_MARGIN = 1e-9
#: Absolute margin (covers subnormal rounding of tiny sums).
ABS_MARGIN = 1e-280
BACKENDS = ("auto", "native", "torch")
#: Groups per torch-backend chunk (candidates x groups x group size floats stay cache-sized).
_TORCH_CHUNK_ELEMS = 1 << 18

_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* Squared error of K candidate (scale, zero) pairs per group at L compute widths.
   w [n_groups, gs] fp32; h [G, gs] fp64 (group g uses row g % G) or NULL for all ones (x * 1.0 == x,
   so skipping it is exact); a, z [K, n_groups];
   stored/bits [L]: stored and compute bits of each width; round_mode: 1 = "round" slicing.
   out [K, n_groups, L] fp64. Processes groups g0..g1-1. Same float ops as the numpy reference;
   the 8-lane sum is numpy's pairwise order for gs <= 128. */
/* the 8-bit code of w under scale a and zero point zf: clamp(rint(w / a) + zf, 0, 255) in fp32 */
static inline int32_t code8(float w, float a, float zf) {
    float t = rintf(w / a) + zf;
    t = t < 0.0f ? 0.0f : t;
    t = t > 255.0f ? 255.0f : t;
    return (int32_t)t;
}

void mq_candidate_errors(const float *w, const double *h, int64_t n_groups, int64_t G, int64_t gs,
                         int64_t K, const float *a, const int32_t *z, int64_t L,
                         const int32_t *stored, const int32_t *bits, int32_t round_mode,
                         double *out, int64_t g0, int64_t g1)
{
    int32_t q[gs];
    double ones[gs];
    for (int64_t i = 0; i < gs; i++) ones[i] = 1.0;
    for (int64_t g = g0; g < g1; g++) {
        const float *wg = w + g * gs;
        const double *hg = h ? h + (g % G) * gs : 0;
        for (int64_t k = 0; k < K; k++) {
            const float ak = a[k * n_groups + g];
            const int32_t zk = z[k * n_groups + g];
            const float zf = (float)zk;
            for (int64_t i = 0; i < gs; i++) {
                q[i] = code8(wg[i], ak, zf);
            }
            for (int64_t l = 0; l < L; l++) {
                const int32_t s1 = 8 - stored[l], r = bits[l];
                double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                if (round_mode && r < 8) {
                    const int32_t s2 = 8 - r, hb = 1 << (7 - r), mx = (1 << r) - 1;
                    const double *hr = hg ? hg : ones;
                    for (int64_t i0 = 0; i0 < gs; i0 += 8) {
                        for (int j = 0; j < 8; j++) {
                            int32_t qp = (q[i0 + j] >> s1) << s1;
                            int32_t sl = (qp + hb) >> s2;
                            sl = sl > mx ? mx : sl;
                            float wh = ak * (float)((sl << s2) - zk);
                            float d = wg[i0 + j] - wh;
                            acc[j] += hr[i0 + j] * ((double)d * (double)d);
                        }
                    }
                } else if (!hg) {
                    const int32_t c = r < 8 ? (1 << (7 - r)) : 0;
                    for (int64_t i0 = 0; i0 < gs; i0 += 8) {
                        for (int j = 0; j < 8; j++) {
                            int32_t qp = (q[i0 + j] >> s1) << s1;
                            float wh = ak * (float)(qp + c - zk);
                            float d = wg[i0 + j] - wh;
                            acc[j] += (double)d * (double)d;
                        }
                    }
                } else {
                    const int32_t c = r < 8 ? (1 << (7 - r)) : 0;
                    for (int64_t i0 = 0; i0 < gs; i0 += 8) {
                        for (int j = 0; j < 8; j++) {
                            int32_t qp = (q[i0 + j] >> s1) << s1;
                            float wh = ak * (float)(qp + c - zk);
                            float d = wg[i0 + j] - wh;
                            acc[j] += hg[i0 + j] * ((double)d * (double)d);
                        }
                    }
                }
                out[(k * n_groups + g) * L + l] =
                    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            }
        }
    }
}

/* Weighted squared errors of one candidate at L widths for group wg (gs elements), accumulated in blocks of
   32 elements with the same 8-lane order as mq_candidate_errors. With wts != NULL and a finite `stop`, the
   candidate is abandoned as soon as its partial objective sum_l wts[l] * e[l] (a lower bound: every term is
   >= 0) exceeds `stop`; returns 1 then, with that partial objective in *lb, else 0. */
static int mq_one(const float *wg, const double *hg, const double *ones, int64_t gs, float ak, int32_t zk,
                  int64_t L, const int32_t *stored, const int32_t *bits, int32_t round_mode,
                  const double *wts, double stop, double *e, int32_t *q, double *lb)
{
    const float zf = (float)zk;
    double acc[8][8];
    for (int64_t l = 0; l < L; l++)
        for (int j = 0; j < 8; j++) acc[l][j] = 0.0;
    for (int64_t b0 = 0; b0 < gs; b0 += 32) {
        const int64_t b1 = b0 + 32 < gs ? b0 + 32 : gs;
        for (int64_t i = b0; i < b1; i++) {
            q[i] = code8(wg[i], ak, zf);
        }
        for (int64_t l = 0; l < L; l++) {
            const int32_t s1 = 8 - stored[l], r = bits[l];
            double A[8];  /* a local copy stays in registers (acc[l] could alias hg) */
            for (int j = 0; j < 8; j++) A[j] = acc[l][j];
            if (round_mode && r < 8) {
                const int32_t s2 = 8 - r, hb = 1 << (7 - r), mx = (1 << r) - 1;
                const double *hr = hg ? hg : ones;
                for (int64_t i0 = b0; i0 < b1; i0 += 8) {
                    for (int j = 0; j < 8; j++) {
                        int32_t qp = (q[i0 + j] >> s1) << s1;
                        int32_t sl = (qp + hb) >> s2;
                        sl = sl > mx ? mx : sl;
                        float d = wg[i0 + j] - ak * (float)((sl << s2) - zk);
                        A[j] += hr[i0 + j] * ((double)d * (double)d);
                    }
                }
            } else if (!hg) {
                const int32_t c = r < 8 ? (1 << (7 - r)) : 0;
                for (int64_t i0 = b0; i0 < b1; i0 += 8) {
                    for (int j = 0; j < 8; j++) {
                        int32_t qp = (q[i0 + j] >> s1) << s1;
                        float d = wg[i0 + j] - ak * (float)(qp + c - zk);
                        A[j] += (double)d * (double)d;
                    }
                }
            } else {
                const int32_t c = r < 8 ? (1 << (7 - r)) : 0;
                for (int64_t i0 = b0; i0 < b1; i0 += 8) {
                    for (int j = 0; j < 8; j++) {
                        int32_t qp = (q[i0 + j] >> s1) << s1;
                        float d = wg[i0 + j] - ak * (float)(qp + c - zk);
                        A[j] += hg[i0 + j] * ((double)d * (double)d);
                    }
                }
            }
            for (int j = 0; j < 8; j++) acc[l][j] = A[j];
        }
        if (wts && b1 < gs && stop < INFINITY) {
            double part = 0.0;
            for (int64_t l = 0; l < L; l++) {
                double sl = 0.0;
                for (int j = 0; j < 8; j++) sl += acc[l][j];
                part += wts[l] * sl;
            }
            if (part > stop) {
                *lb = part;
                return 1;
            }
        }
    }
    for (int64_t l = 0; l < L; l++) {
        const double *A = acc[l];
        e[l] = ((A[0] + A[1]) + (A[2] + A[3])) + ((A[4] + A[5]) + (A[6] + A[7]));
    }
    return 0;
}

/* One stage of the range search for groups g0..g1-1: objective sum_l wts[l] * e[l] of K candidates per group
   (a, z [K, n_groups]), candidates known to lose abandoned early, then the reference's choice: the first
   candidate at the minimum, `certain` when no candidate with another (a, z) comes within the margin
   (rel * |obj| + abs) of it. stage 1 (norm_out != NULL): candidate 0 is the min-max range, fully evaluated;
   wts = lam / max(e0, 1e-30) (normalize) or lam, written to norm_out [n_groups, L]. stage 2 (norm_out ==
   NULL): wts read from wts_in [n_groups, L]; candidate 0's objective is given in obj0 [n_groups].
   Outputs best [n], best_obj [n], certain [n]. */
void mq_search_stage(const float *w, const double *h, int64_t n_groups, int64_t G, int64_t gs, int64_t K,
                     const float *a, const int32_t *z, int64_t L, const int32_t *stored, const int32_t *bits,
                     int32_t round_mode, const double *lam, int32_t normalize, double *norm_out,
                     const double *wts_in, const double *obj0, double rel, double abs_m,
                     int32_t *best, double *best_obj, uint8_t *certain, int64_t g0, int64_t g1)
{
    int32_t q[gs];
    double ones[gs];
    for (int64_t i = 0; i < gs; i++) ones[i] = 1.0;
    double obj[K];
    double e[8], wts[8], lb = 0.0;
    for (int64_t g = g0; g < g1; g++) {
        const float *wg = w + g * gs;
        const double *hg = h ? h + (g % G) * gs : 0;
        double bestv = INFINITY;
        for (int64_t k = 0; k < K; k++) {
            const float ak = a[k * n_groups + g];
            const int32_t zk = z[k * n_groups + g];
            if (k == 0 && !norm_out) {
                obj[0] = obj0[g];
                for (int64_t l = 0; l < L; l++) wts[l] = wts_in[g * L + l];
            } else if (k == 0) {
                mq_one(wg, hg, ones, gs, ak, zk, L, stored, bits, round_mode, 0, INFINITY, e, q, &lb);
                for (int64_t l = 0; l < L; l++) {
                    wts[l] = normalize ? lam[l] / (e[l] > 1e-30 ? e[l] : 1e-30) : lam[l];
                    norm_out[g * L + l] = wts[l];
                }
                obj[0] = 0.0;
                for (int64_t l = 0; l < L; l++) obj[0] += wts[l] * e[l];
            } else {
                /* abandoned candidates keep a lower bound > stop: never within the margin of the minimum */
                const double stop = bestv * (1.0 + 4.0 * rel + 1e-6) + 4.0 * abs_m + 1e-270;
                if (mq_one(wg, hg, ones, gs, ak, zk, L, stored, bits, round_mode, wts, stop, e, q, &lb)) {
                    obj[k] = lb;
                } else {
                    obj[k] = 0.0;
                    for (int64_t l = 0; l < L; l++) obj[k] += wts[l] * e[l];
                }
            }
            if (obj[k] < bestv) bestv = obj[k];
        }
        double upper = INFINITY;
        int finite = 1;
        for (int64_t k = 0; k < K; k++) {
            if (!(obj[k] < INFINITY) || obj[k] != obj[k]) finite = 0;
            const double u = obj[k] + rel * fabs(obj[k]) + abs_m;
            if (u < upper) upper = u;
        }
        int64_t first = -1;
        int ok = finite;
        for (int64_t k = 0; k < K; k++) {
            if (obj[k] - (rel * fabs(obj[k]) + abs_m) <= upper) {
                if (first < 0) first = k;
                else if (a[k * n_groups + g] != a[first * n_groups + g] || z[k * n_groups + g] != z[first * n_groups + g])
                    ok = 0;
            }
        }
        if (first < 0) { first = 0; ok = 0; }
        best[g] = (int32_t)first;
        best_obj[g] = obj[first];
        certain[g] = (uint8_t)ok;
    }
}

/* int8 codes q = clamp(rint(w / a) + z, 0, 255) of groups g0..g1-1 (one (a, z) per group). */
void mq_codes(const float *w, int64_t gs, const float *a, const int32_t *z, uint8_t *out,
              int64_t g0, int64_t g1)
{
    for (int64_t g = g0; g < g1; g++) {
        const float ag = a[g], zf = (float)z[g];
        for (int64_t i = 0; i < gs; i++) {
            out[g * gs + i] = (uint8_t)code8(w[g * gs + i], ag, zf);
        }
    }
}
"""
_CFLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]


# ------------------------------------------------------------------------------------ native kernel
def _compile(cc: str, out: Path) -> None:
    last = None
    for extra in (["-march=native"], []):
        last = compile_library(cc, _C_SOURCE, [*_CFLAGS, *extra], out, timeout_s=120)
        if last is None:
            return
    raise RuntimeError(f"{cc} failed: {last}")


@lru_cache(maxsize=1)
def native_kernel() -> Any | None:
    """The compiled C kernel (ctypes library), or None when no C compiler is usable.

    Built once per machine into ``$MOESTREAM_CACHE_DIR/kernels`` (default
    ``~/.cache/moestream/kernels``), keyed by the source, flags and CPU; checked
    against the numpy formulas on a small input before it is used.
    """
    cc = find_compiler()
    if cc is None:
        log.info("no C compiler (%s) found: the matryoshka range search uses the torch backend",
                 os.environ.get("CC") or "cc")
        return None
    path = library_path("mq_kernel", _C_SOURCE, _CFLAGS, cc)
    try:
        if not path.is_file():
            try:
                _compile(cc, path)
            except PermissionError:
                path = Path(tempfile.gettempdir()) / f"moestream-{os.getuid()}" / path.name
                if not path.is_file():
                    _compile(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("could not build the native range-search kernel (%s); using the slower torch backend", exc)
        return None
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.mq_candidate_errors.argtypes = [P, P, I64, I64, I64, I64, P, P, I64, P, P, I32, P, I64, I64]
    lib.mq_candidate_errors.restype = None
    lib.mq_codes.argtypes = [P, I64, P, P, P, I64, I64]
    D = ctypes.c_double
    lib.mq_search_stage.argtypes = [P, P, I64, I64, I64, I64, P, P, I64, P, P, I32, P, I32, P, P, P, D, D, P, P, P,
                                    I64, I64]
    lib.mq_search_stage.restype = None
    lib.mq_codes.restype = None
    if not _self_check(lib):
        log.warning("native range-search kernel at %s disagrees with numpy; using the torch backend", path)
        return None
    return lib


def _self_check(lib: Any) -> bool:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 2, 16)) * 0.1).astype(np.float32)
    h = np.abs(rng.standard_normal((2, 16)))
    a = np.full((1, 8), 0.004, np.float32)
    z = np.full((1, 8), 100, np.int32)
    stored, bits = np.array([2, 8], np.int32), np.array([2, 8], np.int32)
    q = np.clip(np.round(w / np.float32(0.004)).astype(np.int32) + 100, 0, 255)
    for hh in (h, np.ones_like(h)):
        got = _native_errors(lib, w, hh, a, z, stored, bits, False, 1)
        want = []
        for r in (2, 8):
            m = ((q >> (8 - r)) << (8 - r)) + ((1 << (7 - r)) if r < 8 else 0)
            wh = np.float32(0.004) * (m - 100).astype(np.float32)
            want.append((hh[None] * (w - wh).astype(np.float64) ** 2).sum(axis=2).reshape(-1))
        if not np.allclose(got[0], np.stack(want, axis=1), rtol=1e-12, atol=0):
            return False
    return bool(np.array_equal(_native_codes(lib, w, a[0], z[0], 1), q.astype(np.uint8)))


def _spans(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges, edges[1:]) if b > a]


def _run_spans(fn: Any, n: int, threads: int) -> None:
    """``fn(g0, g1)`` over [0, n) on ``threads`` threads; 4 spans per thread balance a core shared with others."""
    if threads <= 1:
        fn(0, n)
        return
    spans = _spans(n, 4 * threads)
    with ThreadPoolExecutor(threads) as pool:  # ctypes calls and torch ops release the GIL
        list(pool.map(lambda s: fn(*s), spans))


def _native_errors(lib: Any, w: np.ndarray, h: np.ndarray, a: np.ndarray, z: np.ndarray,
                   stored: np.ndarray, bits: np.ndarray, round_mode: bool, threads: int) -> np.ndarray:
    R, G, gs = w.shape
    n, K, L = R * G, a.shape[0], len(bits)
    w = np.ascontiguousarray(w, dtype=np.float32)
    h = np.array(np.broadcast_to(h, (G, gs)), dtype=np.float64)
    h_ptr = None if (h == 1.0).all() else h.ctypes.data
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(K, n)
    z = np.ascontiguousarray(z, dtype=np.int32).reshape(K, n)
    stored = np.ascontiguousarray(stored, dtype=np.int32)
    bits = np.ascontiguousarray(bits, dtype=np.int32)
    out = np.empty((K, n, L), dtype=np.float64)

    def run(g0: int, g1: int) -> None:
        lib.mq_candidate_errors(w.ctypes.data, h_ptr, n, G, gs, K, a.ctypes.data, z.ctypes.data, L,
                                stored.ctypes.data, bits.ctypes.data, int(round_mode), out.ctypes.data, g0, g1)

    _run_spans(run, n, threads)
    return out


def _native_stage(lib: Any, w: np.ndarray, h: np.ndarray, a: np.ndarray, z: np.ndarray, codec: "MatryoshkaCodec",
                  wts: np.ndarray | None, obj0: np.ndarray | None,
                  threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One search stage in C (``mq_search_stage``): (best index, its objective, certain, weights) per group."""
    R, G, gs = w.shape
    n, K = R * G, a.shape[0]
    L = len(codec.level_bits)
    w = np.ascontiguousarray(w, dtype=np.float32)
    hh = np.array(np.broadcast_to(np.asarray(h, dtype=np.float64).reshape(-1, G, gs)[0], (G, gs)))
    h_ptr = None if (hh == 1.0).all() else hh.ctypes.data
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(K, n)
    z = np.ascontiguousarray(z, dtype=np.int32).reshape(K, n)
    stored = np.ascontiguousarray(codec.stored_bits, dtype=np.int32)
    bits = np.ascontiguousarray(codec.level_bits, dtype=np.int32)
    lam = np.ascontiguousarray(codec.lambdas, dtype=np.float64)
    first_stage = wts is None
    wts = np.empty((n, L), dtype=np.float64) if first_stage else np.ascontiguousarray(wts, dtype=np.float64)
    obj0 = np.zeros(n) if obj0 is None else np.ascontiguousarray(obj0, dtype=np.float64)
    best = np.empty(n, dtype=np.int32)
    best_obj = np.empty(n, dtype=np.float64)
    certain = np.empty(n, dtype=np.uint8)

    def run(g0: int, g1: int) -> None:
        lib.mq_search_stage(w.ctypes.data, h_ptr, n, G, gs, K, a.ctypes.data, z.ctypes.data, L, stored.ctypes.data,
                            bits.ctypes.data, int(codec.slicing == "round"), lam.ctypes.data, int(codec.normalize),
                            wts.ctypes.data if first_stage else None, None if first_stage else wts.ctypes.data,
                            obj0.ctypes.data, REL_MARGIN, ABS_MARGIN, best.ctypes.data, best_obj.ctypes.data,
                            certain.ctypes.data, g0, g1)

    _run_spans(run, n, threads)
    return best.astype(np.int64), best_obj, certain.astype(bool), wts


def _native_codes(lib: Any, w: np.ndarray, alpha: np.ndarray, z: np.ndarray, threads: int) -> np.ndarray:
    R, G, gs = w.shape
    w = np.ascontiguousarray(w, dtype=np.float32)
    a = np.ascontiguousarray(alpha, dtype=np.float32).reshape(-1)
    zz = np.ascontiguousarray(z, dtype=np.int32).reshape(-1)
    out = np.empty((R, G, gs), dtype=np.uint8)
    _run_spans(lambda g0, g1: lib.mq_codes(w.ctypes.data, gs, a.ctypes.data, zz.ctypes.data, out.ctypes.data,
                                           g0, g1), R * G, threads)
    return out


# ------------------------------------------------------------------------------------ torch backend
def _width_codes_torch(q: torch.Tensor, stored: int, r: int, round_mode: bool) -> torch.Tensor:
    """m(q) of one width (integer-valued float32), as in ``MatryoshkaCodec._dequant_all``."""
    step = float(1 << (8 - stored))
    qp = torch.floor(q * (1.0 / step)).mul_(step)  # (q >> s) << s, exact in float32
    if round_mode and r < 8:
        sl = torch.floor((qp + float(1 << (7 - r))) * (1.0 / (1 << (8 - r)))).clamp_(max=float((1 << r) - 1))
        return sl * float(1 << (8 - r))
    return qp + float((1 << (7 - r)) if r < 8 else 0)


def _torch_errors(w: np.ndarray, h: np.ndarray, a: np.ndarray, z: np.ndarray, stored: np.ndarray,
                  bits: np.ndarray, round_mode: bool, threads: int) -> np.ndarray:
    R, G, gs = w.shape
    n, K, L = R * G, a.shape[0], len(bits)
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(n, gs))
    ht = torch.from_numpy(np.array(np.broadcast_to(h, (G, gs)), dtype=np.float64))
    at = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(K, n))
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32).reshape(K, n))
    out = torch.empty((K, n, L), dtype=torch.float64)
    step = max(1, _TORCH_CHUNK_ELEMS // (K * gs))
    gidx = torch.arange(n) % G

    def run(c0: int, c1: int) -> None:
        for g0 in range(c0 * step, min(n, c1 * step), step):
            sl = slice(g0, min(n, g0 + step))
            wc = wt[sl][None]  # [1, c, gs]
            ac, zc = at[:, sl, None], zt[:, sl, None]  # [K, c, 1]
            hc = ht[gidx[sl]][None]  # [1, c, gs]
            q = torch.div(wc, ac).round_().add_(zc).clamp_(0, 255)  # [K, c, gs]
            for j in range(L):
                m = _width_codes_torch(q, int(stored[j]), int(bits[j]), round_mode).sub_(zc)
                d = torch.sub(wc, m.mul_(ac)).double()  # exact float32 ops, then float64 as the reference
                out[:, sl, j] = (hc * d.square_()).sum(dim=2)

    # many small ops: torch's own intra-op threads wait on each other when a core is busy elsewhere
    # (measured 10-20x slower on 2 shared cores), so run chunks on Python threads with 1 torch thread each
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_spans(run, (n + step - 1) // step, threads)
    finally:
        torch.set_num_threads(before)
    return out.numpy()


def _torch_codes(w: np.ndarray, alpha: np.ndarray, z: np.ndarray) -> np.ndarray:
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    a = torch.from_numpy(np.ascontiguousarray(alpha, dtype=np.float32))[:, :, None]
    zz = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))[:, :, None]
    return torch.div(wt, a).round_().add_(zz).clamp_(0, 255).to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------ public
def resolve_backend(backend: str | None = None) -> str:
    """``native`` or ``torch``: the explicit choice, else ``$MOESTREAM_CODEC_BACKEND``, else native when it builds.

    Raises:
        ValueError: an unknown backend name, or ``native`` asked for without a working compiler.
    """
    choice = (backend or os.environ.get("MOESTREAM_CODEC_BACKEND") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown codec backend {choice!r}; use one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if native_kernel() is not None:
        return "native"
    if choice == "native":
        raise ValueError("the native codec backend needs a working C compiler (cc, or $CC); "
                         "install gcc or use MOESTREAM_CODEC_BACKEND=torch")
    return "torch"


def candidate_errors(w: np.ndarray, h: np.ndarray, a: np.ndarray, z: np.ndarray, stored: tuple[int, ...],
                     bits: tuple[int, ...], round_mode: bool, backend: str | None = None) -> np.ndarray:
    """Weighted squared error of K candidate (scale, zero) pairs per group, per compute width.

    Args:
        w: fp32 [R, G, gs] grouped weight.
        h: fp64 [1, G, gs] per-element error weights (ones without activations).
        a: fp32 [K, R, G] scales α (already rounded to their storage dtype).
        z: int [K, R, G] zero points.
        stored, bits: stored and compute bits of each width.
        round_mode: the codec's ``slicing == "round"``.
        backend: see :func:`resolve_backend`.

    Returns:
        fp64 [K, R*G, L]: equal to the reference sums up to summation order.
    """
    st, bt = np.asarray(stored, np.int32), np.asarray(bits, np.int32)
    hh = np.asarray(h, dtype=np.float64).reshape(-1, w.shape[1], w.shape[2])[0]
    if resolve_backend(backend) == "native":
        return _native_errors(native_kernel(), w, hh, a, z, st, bt, round_mode, torch.get_num_threads())
    return _torch_errors(w, hh, a, z, st, bt, round_mode, torch.get_num_threads())


def int8_codes(w: np.ndarray, alpha: np.ndarray, z: np.ndarray, backend: str | None = None) -> np.ndarray:
    """uint8 [R, G, gs] codes clamp(round(w/α) + z, 0, 255), identical to ``MatryoshkaCodec._codes``."""
    if resolve_backend(backend) == "native":
        return _native_codes(native_kernel(), w, alpha, z, torch.get_num_threads())
    return _torch_codes(w, alpha, z)


def _objective(codec: "MatryoshkaCodec", e: np.ndarray, norm: list[np.ndarray] | None) -> np.ndarray:
    """Σ_r λ_r·E_r [K, n] from errors [K, n, L], with the reference's operation order."""
    total = np.zeros(e.shape[:2], dtype=np.float64)
    for j, lam in enumerate(codec.lambdas):
        if lam:
            total += lam * (e[:, :, j] / norm[j] if norm is not None else e[:, :, j])
    return total


def _first_argmin(obj: np.ndarray, a: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the reference's choice (first candidate at the minimum) and whether it is certain.

    Args:
        obj: fp64 [K, n] objectives (summation order may differ from the reference's).
        a, z: [K, n] the candidates' scale and zero (equal pairs have equal exact objectives).

    Returns:
        (index [n], certain [n] bool).
    """
    margin = REL_MARGIN * np.abs(obj) + ABS_MARGIN
    upper = (obj + margin).min(axis=0)  # the true minimum is at most this
    contender = obj - margin <= upper[None]  # [K, n]: could be the minimum
    first = contender.argmax(axis=0)
    cols = np.arange(obj.shape[1])
    same = (a == a[first, cols][None]) & (z == z[first, cols][None])
    certain = ~(contender & ~same).any(axis=0) & np.isfinite(obj).all(axis=0)
    return first, certain


def search_ranges(codec: "MatryoshkaCodec", wg: np.ndarray, h: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  backend: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The codec's two-stage range search, bit-identical to ``codec.search_ranges_reference``.

    Args:
        codec: a :class:`~moestream.convert.codecs.matryoshka.MatryoshkaCodec` with ``search`` on.
        wg: fp32 [R, G, gs]; h: fp64 [1, G, gs]; lo, hi: fp64 [R, G] min-max ranges (containing 0).
        backend: see :func:`resolve_backend`.

    Returns:
        (best_lo, best_hi) fp64 [R, G], and counts {"groups", "reference_groups"} (groups settled by
        the reference search because of near-ties).
    """
    R, G, _ = wg.shape
    n = R * G
    stored, bits, rnd = codec.stored_bits, codec.level_bits, codec.slicing == "round"
    lo_f, hi_f = lo.reshape(n), hi.reshape(n)

    def candidates(clo: np.ndarray, chi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alpha, z = codec._scale_zero(clo, chi)  # [K, n], exactly as the reference
        return alpha.astype(np.float32), z

    native = resolve_backend(backend) == "native"
    threads = torch.get_num_threads()
    # stage 1: min-max first, then the common clipping factors in order
    cs = np.array([1.0] + [c for c in codec.clip_grid if c != 1.0], dtype=np.float64)
    clo1 = np.stack([lo_f] + [lo_f * c for c in cs[1:]])
    chi1 = np.stack([hi_f] + [hi_f * c for c in cs[1:]])
    a1, z1 = candidates(clo1, chi1)
    cols = np.arange(n)
    if native:  # objective, early abandoning and the choice in C
        k1, best_obj, ok1, wts = _native_stage(native_kernel(), wg, h, a1, z1, codec, None, None, threads)
    else:
        e1 = candidate_errors(wg, h, a1.reshape(-1, R, G), z1.reshape(-1, R, G), stored, bits, rnd, backend)
        norm = [np.maximum(e1[0, :, j], 1e-30) for j in range(len(bits))] if codec.normalize else None
        obj1 = _objective(codec, e1, norm)
        k1, ok1 = _first_argmin(obj1, a1, z1)
        best_obj = obj1[k1, cols]
    best_c = cs[k1]
    best_lo, best_hi = clo1[k1, cols], chi1[k1, cols]
    best_a, best_z = a1[k1, cols], z1[k1, cols]
    # stage 2: per-side refinement around each group's best common factor
    pairs = [(dl, dh) for dl in codec.refine for dh in codec.refine if not (dl == 0.0 and dh == 0.0)]
    ok = ok1
    if pairs:
        clo2 = np.stack([lo_f * np.maximum(best_c + dl, 0.05) for dl, _ in pairs])
        chi2 = np.stack([hi_f * np.maximum(best_c + dh, 0.05) for _, dh in pairs])
        a2, z2 = candidates(clo2, chi2)
        a_all, z_all = np.concatenate([best_a[None], a2]), np.concatenate([best_z[None], z2])
        if native:
            k2, _, ok2, _ = _native_stage(native_kernel(), wg, h, a_all, z_all, codec, wts, best_obj, threads)
        else:
            e2 = candidate_errors(wg, h, a2.reshape(-1, R, G), z2.reshape(-1, R, G), stored, bits, rnd, backend)
            k2, ok2 = _first_argmin(np.concatenate([best_obj[None], _objective(codec, e2, norm)]), a_all, z_all)
        take = k2 > 0
        best_lo = np.where(take, clo2[np.maximum(k2 - 1, 0), cols], best_lo)
        best_hi = np.where(take, chi2[np.maximum(k2 - 1, 0), cols], best_hi)
        ok = ok1 & ok2
    unsure = np.flatnonzero(~ok)
    if unsure.size:  # near-ties: the reference search on those groups alone
        w_sub = np.ascontiguousarray(wg.reshape(n, 1, -1)[unsure])
        h_sub = np.ascontiguousarray(np.broadcast_to(h, (1, G, wg.shape[2]))[0][unsure % G][:, None, :])
        rlo, rhi = codec.search_ranges_reference(w_sub, h_sub, lo_f[unsure, None], hi_f[unsure, None])
        best_lo, best_hi = best_lo.copy(), best_hi.copy()
        best_lo[unsure], best_hi[unsure] = rlo[:, 0], rhi[:, 0]
    return best_lo.reshape(R, G), best_hi.reshape(R, G), {"groups": n, "reference_groups": int(unsure.size)}
