"""Scheme A: Matryoshka MSB slicing of per-group asymmetric int8 codes.

Owns the ``matryoshka`` codecs (spec: /work/shared/specs/nested-quant.md).
Per group of ``group_size`` input channels of one output row:

    α = (hi − lo)/255 (stored f16),  z = round(−lo/α) ∈ [0, 255] (u8),
    q8 = clamp(round(w/α) + z, 0, 255).

A level of r compute bits is a uniform grid with step α·2^(8−r) and the same
zero point, so int4/int8 weight-only kernels can run it. Two slicings:

* ``slicing="round"`` (the spec formula, name ``matryoshka``):
  S(q8, r) = clamp((q8 + 2^(7−r)) >> (8−r), 0, 2^r − 1), ŵ = α·(S·2^(8−r) − z).
  S depends on the top r+1 bits of q8 (the rounding bit), so a level of r
  compute bits must store r+1 bits: planes of 3, 2, 3 bits give levels of
  2, 4, 8 compute bits from 3, 5, 8 stored bits. (A 2/2/4 split cannot
  carry the rounded slice: S(·,4)=15 has 24 preimages, not a multiple of 16.)
* ``slicing="floor"`` (name ``matryoshka_floor``): planes are the raw top
  2, next 2, low 4 bits; level r decodes the truncated code t = q8 >> (8−r)
  at its bin centre: ŵ = α·(t·2^(8−r) + 2^(7−r) − z) (r < 8).

Group ranges [lo, hi] (always containing 0) are chosen per group by a grid
search over clipping factors minimising Σ_r λ_r Σ_i h_i (w_i − ŵ_{r,i})²
(h = calibration diag(XᵀX) per input channel, or 1), by default with each
width's error divided by its min-max error (``normalize``; measured: without
it the 2-bit term decides alone and the 8-bit level degrades ~600× on
heavy-tailed weights). The min-max range is always a candidate, so the search is never worse than min-max on that
objective. :meth:`MatryoshkaCodec.encode` runs the search through :mod:`.range_search` (a compiled kernel, or
torch); :meth:`MatryoshkaCodec.encode_reference` is the same search written plainly in numpy, and both give
the same bytes.

Knows nothing about files, kernels or the engine.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from moestream.convert.codecs.base import (
    Codec, EncodedTensor, as_torch, check_weight, group_weights, pack_bits, store_scale, unpack_bits,
    unpack_bits_torch,
)

#: Default λ per compute width (MatQuant post-training weighting: 8, 4 ≈ 0.2; 2 = 1).
DEFAULT_LAMBDAS = {8: 0.2, 4: 0.2, 2: 1.0}
#: Stage-1 common clipping factors (applied to both lo and hi); 1.0 = min-max.
DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
#: Stage-2 per-side refinement offsets around the best common factor.
DEFAULT_REFINE = (-0.05, -0.025, 0.0, 0.025, 0.05)


def slice_code(q8: np.ndarray, r: int) -> np.ndarray:
    """The spec's MSB slice S(q8, r) = clamp((q8 + 2^(7−r)) >> (8−r), 0, 2^r − 1) (int32)."""
    q = np.asarray(q8, dtype=np.int32)
    if r >= 8:
        return q.copy()
    return np.clip((q + (1 << (7 - r))) >> (8 - r), 0, (1 << r) - 1)


def decode_level(planes: Sequence[torch.Tensor], zero: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, *,
                 plane_bits: tuple[int, ...], stored_bits: int, r: int, slicing: str) -> torch.Tensor:
    """Decode one matrix at a level from its planes into ``out`` (tensors on any one device).

    A pure tensor function (its static arguments from :meth:`MatryoshkaCodec.level_spec`), so it can
    be handed to ``torch.compile`` as is: every step is exact integer arithmetic up to one fp32
    product per weight, so a fused kernel yields the same bits.

    Args:
        planes: packed bit planes 1..level (uint8), each ``R*C*plane_bits[j]/8`` bytes.
        zero: uint8 ``[R, G]`` zero points; scale: f16/f32 ``[R, G]`` α.
        out: fp32 ``[R, C]`` (contiguous), written and returned.
        plane_bits: bits each plane adds; stored_bits: their sum; r: compute bits of the level;
        slicing: ``round`` or ``floor``.
    """
    R, C = out.shape
    G = zero.shape[1]
    top = None
    for j, pb in enumerate(plane_bits):
        v = unpack_bits_torch(planes[j], pb, R * C).to(torch.int32)
        top = v if top is None else (top << pb) | v
    q = top << (8 - stored_bits)
    if r < 8 and slicing == "round":
        q = torch.clamp((q + (1 << (7 - r))) >> (8 - r), 0, (1 << r) - 1) << (8 - r)
    elif r < 8:
        q = q + (1 << (7 - r))
    m = q.view(R, G, -1) - zero.to(torch.int32)[:, :, None]
    out.view(R, G, -1).copy_(m.to(torch.float32) * scale.to(torch.float32)[:, :, None])
    return out


class MatryoshkaCodec(Codec):
    """Nested uniform codes; see the module docstring for the formulas.

    Args:
        level_bits: compute bits of levels 1..L, increasing, last one 8.
        slicing: "round" (spec S formula, r+1 stored bits) or "floor" (raw bits, bin centre).
        lambdas: weight per compute width in the range-search objective
            (mapping bits -> λ, or a sequence aligned with ``level_bits``).
        scale_dtype: "f16" or "f32" storage of α.
        search: False keeps per-group min-max ranges.
        clip_grid / refine: range-search candidates (see module docstring).
    """

    name = "matryoshka"

    def __init__(self, level_bits: Sequence[int] = (2, 4, 8), slicing: str = "round",
                 lambdas: Any = None, scale_dtype: str = "f16", search: bool = True,
                 clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
                 refine: Sequence[float] = DEFAULT_REFINE, normalize: bool = True) -> None:
        bits = tuple(int(b) for b in level_bits)
        if not bits or bits[-1] != 8 or any(b2 <= b1 for b1, b2 in zip(bits, bits[1:])) or bits[0] < 1:
            raise ValueError(f"level_bits must increase and end at 8, got {level_bits}")
        if slicing not in ("round", "floor"):
            raise ValueError(f"slicing must be 'round' or 'floor', got {slicing!r}")
        self._bits = bits
        self.slicing = slicing
        stored = [b if (b == 8 or slicing == "floor") else b + 1 for b in bits]
        if any(s2 <= s1 for s1, s2 in zip(stored, stored[1:])):
            raise ValueError(f"with slicing='round' level bits {bits} need distinct stored widths "
                             f"{stored}; leave a gap of at least 2 bits between levels")
        self.stored_bits = tuple(stored)
        self.plane_bits = tuple(b - a for a, b in zip((0,) + self.stored_bits, self.stored_bits))
        if lambdas is None:
            lam = [DEFAULT_LAMBDAS.get(b, 0.2) for b in bits]
        elif isinstance(lambdas, dict):
            lam = [float(lambdas.get(b, lambdas.get(str(b), 0.0))) for b in bits]
        else:
            lam = [float(x) for x in lambdas]
        if len(lam) != len(bits) or any(x < 0 for x in lam) or sum(lam) <= 0:
            raise ValueError(f"lambdas must give one non-negative weight per level {bits}, got {lambdas}")
        self.lambdas = tuple(lam)
        self.scale_dtype = scale_dtype
        self.search = bool(search)
        self.clip_grid = tuple(float(c) for c in clip_grid)
        self.refine = tuple(float(c) for c in refine)
        self.normalize = bool(normalize)

    # ------------------------------------------------------------------ interface
    @property
    def level_bits(self) -> tuple[int, ...]:
        return self._bits

    @property
    def params(self) -> dict[str, Any]:
        return {"level_bits": list(self._bits), "slicing": self.slicing, "lambdas": list(self.lambdas),
                "scale_dtype": self.scale_dtype, "search": self.search,
                "clip_grid": list(self.clip_grid), "refine": list(self.refine), "normalize": self.normalize}

    def stored_bits_per_weight(self, level: int, group_size: int, scale_bytes: int | None = None) -> float:
        sb = scale_bytes if scale_bytes is not None else (2 if self.scale_dtype == "f16" else 4)
        return self.stored_bits[level - 1] + 8.0 * (sb + 1) / group_size

    def encode(self, weight: np.ndarray, group_size: int, act_scale: np.ndarray | None = None,
               *, backend: str | None = None) -> EncodedTensor:
        """See :meth:`Codec.encode`. ``backend`` picks how the range search computes
        (:func:`moestream.convert.codecs.range_search.resolve_backend`); the bytes never depend on it."""
        from moestream.convert.codecs import range_search

        return self._encode(weight, group_size, act_scale, backend=range_search.resolve_backend(backend))

    def encode_reference(self, weight: np.ndarray, group_size: int,
                         act_scale: np.ndarray | None = None) -> EncodedTensor:
        """The straightforward encoder (whole-matrix numpy per candidate); :meth:`encode` equals it bit for bit."""
        return self._encode(weight, group_size, act_scale, backend=None)

    def _encode(self, weight: np.ndarray, group_size: int, act_scale: np.ndarray | None,
                backend: str | None) -> EncodedTensor:
        from moestream.convert.codecs import range_search

        w = check_weight(weight, group_size, act_scale)
        R, C = w.shape
        G = C // group_size
        wg = w.reshape(R, G, group_size)
        h = group_weights(act_scale, R, C, group_size)  # [1, G, gs]
        lo = np.minimum(wg.min(axis=2), 0.0).astype(np.float64)
        hi = np.maximum(wg.max(axis=2), 0.0).astype(np.float64)
        if not self.search:
            best_lo, best_hi = lo, hi
        elif backend is None:
            best_lo, best_hi = self.search_ranges_reference(wg, h, lo, hi)
        else:
            best_lo, best_hi, _ = range_search.search_ranges(self, wg, h, lo, hi, backend)
        alpha, z = self._scale_zero(best_lo, best_hi)
        if backend is None:
            q8 = self._codes(wg, alpha, z)  # [R, G, gs] int32 0..255
        else:
            q8 = range_search.int8_codes(wg, alpha.astype(np.float32), z, backend)  # same values, uint8
        segments: list[dict[str, np.ndarray]] = []
        prev = 0
        for j, (sb, pb) in enumerate(zip(self.stored_bits, self.plane_bits)):
            plane = (q8 >> (8 - sb)) & ((1 << pb) - 1)
            seg: dict[str, np.ndarray] = {}
            if j == 0:
                seg["scale"] = alpha
                seg["zero"] = z.astype(np.uint8)
            seg[f"plane{j + 1}"] = pack_bits(plane.reshape(-1), pb)
            segments.append(seg)
            prev = sb
        assert prev == 8
        name = "matryoshka" if self.slicing == "round" else "matryoshka_floor"
        return EncodedTensor(codec=name, params=self.params, shape=(R, C), group_size=group_size,
                             segments=segments)

    def search_ranges_reference(self, wg: np.ndarray, h: np.ndarray, lo: np.ndarray,
                                hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The range search written out plainly: every candidate evaluated on all groups at once.

        Args:
            wg: fp32 [R, G, gs]; h: fp64 error weights broadcastable to it; lo, hi: fp64 [R, G]
                min-max ranges (containing 0).

        Returns:
            (best_lo, best_hi) fp64 [R, G]: per group the first candidate with the smallest objective.
        """
        best_lo, best_hi = lo.copy(), hi.copy()
        norm = self._norm(wg, h, lo, hi)
        best_err = self._objective(wg, h, lo, hi, norm)
        best_c = np.ones_like(lo)
        for c in self.clip_grid:
            if c == 1.0:
                continue
            err = self._objective(wg, h, lo * c, hi * c, norm)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_c = np.where(better, c, best_c)
            best_lo = np.where(better, lo * c, best_lo)
            best_hi = np.where(better, hi * c, best_hi)
        for dl in self.refine:
            for dh in self.refine:
                if dl == 0.0 and dh == 0.0:
                    continue
                clo, chi = lo * np.maximum(best_c + dl, 0.05), hi * np.maximum(best_c + dh, 0.05)
                err = self._objective(wg, h, clo, chi, norm)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_lo = np.where(better, clo, best_lo)
                best_hi = np.where(better, chi, best_hi)
        return best_lo, best_hi

    def reference_decode(self, enc: EncodedTensor, level: int) -> np.ndarray:
        codes, alpha, shift, offset = self.level_codes(enc, level)
        R, C = enc.shape
        G = C // enc.group_size
        m = (codes.astype(np.int32).reshape(R, G, -1) << shift) + offset[:, :, None]  # exact integers
        return (alpha[:, :, None] * m.astype(np.float32)).reshape(R, C)

    def torch_decode(self, enc: EncodedTensor, level: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        R, C = enc.shape
        planes = [as_torch(enc.segments[j][f"plane{j + 1}"]) for j in range(level)]
        zero = as_torch(enc.segments[0]["zero"])
        alpha = as_torch(enc.segments[0]["scale"])
        if out is None:
            out = torch.empty((R, C), dtype=torch.float32, device=alpha.device)
        return decode_level(planes, zero, alpha, out, **self.level_spec(level))

    def level_spec(self, level: int) -> dict[str, Any]:
        """The static arguments of :func:`decode_level` for ``level`` (1-based)."""
        return {"plane_bits": self.plane_bits[:level], "stored_bits": self.stored_bits[level - 1],
                "r": self._bits[level - 1], "slicing": self.slicing}

    # ------------------------------------------------------------------ helpers
    def level_codes(self, enc: EncodedTensor, level: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        """Integer form of level ``level``: ŵ = α·((codes << shift) + offset).

        Returns:
            codes uint8 [rows, cols] in 0..2^r−1, alpha fp32 [rows, G],
            shift = 8 − r, offset int32 [rows, G] (= bin-centre term − z).
        """
        R, C = enc.shape
        G = C // enc.group_size
        B = self.stored_bits[level - 1]
        r = self._bits[level - 1]
        top = np.zeros(R * C, dtype=np.int32)
        for j in range(level):
            pb = self.plane_bits[j]
            top = (top << pb) | unpack_bits(enc.segments[j][f"plane{j + 1}"], pb, R * C).astype(np.int32)
        q8_part = top << (8 - B)  # the stored top bits, low bits zero
        if self.slicing == "round":
            codes = slice_code(q8_part, r)
            centre = 0
        else:
            codes = q8_part >> (8 - r)
            centre = (1 << (7 - r)) if r < 8 else 0
        z = np.asarray(enc.segments[0]["zero"], dtype=np.int32)
        alpha = np.asarray(enc.segments[0]["scale"], dtype=np.float32)
        return codes.astype(np.uint8).reshape(R, C), alpha, 8 - r, (centre - z).astype(np.int32)

    def _scale_zero(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alpha = store_scale((hi - lo) / 255.0, self.scale_dtype)
        z = np.clip(np.round(-lo / alpha.astype(np.float64)), 0, 255).astype(np.int32)
        return alpha, z

    @staticmethod
    def _codes(wg: np.ndarray, alpha: np.ndarray, z: np.ndarray) -> np.ndarray:
        a = alpha.astype(np.float32)[:, :, None]
        return np.clip(np.round(wg / a).astype(np.int32) + z[:, :, None], 0, 255)

    def _dequant_all(self, q8: np.ndarray, alpha: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        out = []
        a = alpha.astype(np.float32)[:, :, None]
        for r, B in zip(self._bits, self.stored_bits):
            q_part = (q8 >> (8 - B)) << (8 - B)
            if self.slicing == "round":
                m = (slice_code(q_part, r) << (8 - r))
            else:
                m = q_part + ((1 << (7 - r)) if r < 8 else 0)
            out.append(a * (m - z[:, :, None]).astype(np.float32))
        return out

    def _width_errors(self, wg: np.ndarray, h: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
        """Activation-weighted squared error per group [R, G] at each width for ranges [lo, hi]."""
        alpha, z = self._scale_zero(lo, hi)
        q8 = self._codes(wg, alpha, z)
        return [(h * (wg - wh).astype(np.float64) ** 2).sum(axis=2) for wh in self._dequant_all(q8, alpha, z)]

    def _norm(self, wg: np.ndarray, h: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray] | None:
        """Per-width min-max errors used to normalise the objective (None when normalize=False)."""
        if not self.normalize:
            return None
        return [np.maximum(e, 1e-30) for e in self._width_errors(wg, h, lo, hi)]

    def _objective(self, wg: np.ndarray, h: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                   norm: list[np.ndarray] | None) -> np.ndarray:
        """Σ_r λ_r·E_r per group [R, G]; with ``normalize`` each E_r is divided by its min-max value.

        Without normalisation the 2-bit error (largest by far) decides the range alone and the
        8-bit level inherits heavy clipping; normalising makes λ weigh relative degradations.
        """
        errs = self._width_errors(wg, h, lo, hi)
        total = np.zeros(wg.shape[:2], dtype=np.float64)
        for j, (lam, e) in enumerate(zip(self.lambdas, errs)):
            if lam:
                total += lam * (e / norm[j] if norm is not None else e)
        return total

    def objective(self, weight: np.ndarray, enc: EncodedTensor,
                  act_scale: np.ndarray | None = None) -> float:
        """The range-search objective of an encoding summed over groups (for tests and reports)."""
        w = check_weight(weight, enc.group_size, act_scale)
        R, C = w.shape
        wg = w.reshape(R, C // enc.group_size, enc.group_size)
        h = group_weights(act_scale, R, C, enc.group_size)
        lo = np.minimum(wg.min(axis=2), 0.0).astype(np.float64)
        hi = np.maximum(wg.max(axis=2), 0.0).astype(np.float64)
        norm = self._norm(wg, h, lo, hi)
        total = np.zeros(wg.shape[:2], dtype=np.float64)
        for j, lam in enumerate(self.lambdas):
            e = (h * (wg - enc.reference_decode(j + 1).reshape(wg.shape)).astype(np.float64) ** 2).sum(axis=2)
            total += lam * (e / norm[j] if norm is not None else e)
        return float(total.sum())


class MatryoshkaFloorCodec(MatryoshkaCodec):
    """Matryoshka with raw 2/2/4 bit planes and bin-centre decode (see module docstring)."""

    name = "matryoshka_floor"

    def __init__(self, **kwargs: Any) -> None:
        kwargs["slicing"] = "floor"
        super().__init__(**kwargs)
