"""Scheme B: D²MoE base INT-b plus 1-bit residual sign planes (``residual`` codec).

Owns the ``residual`` codec (spec: /work/shared/specs/nested-quant.md,
D²MoE MWQ, arXiv 2504.15299). Per group of ``group_size`` input channels:

    level 1: s1 = (hi − lo)/(2^b − 1) (f16), z1 = round(−lo/s1) (u8),
             Q1 = clamp(round(w/s1) + z1, 0, 2^b − 1),  Ŵ1 = s1·(Q1 − z1)
    level k: R = W − Ŵ_{k−1};  Q_k = sign(R) ∈ {±1} (sign(0) = +1, 1 bit);
             s_k = mean|R| (f16) — or, with calibration activations h = diag(XᵀX),
             s_k = Σ h|R| / Σ h (the D²MoE qᵀHr/qᵀHq with a diagonal H);
             Ŵ_k = Ŵ_{k−1} + s_k·Q_k   (fp32, in this order — decoders repeat it exactly)

[lo, hi] is the group's min-max range extended to contain 0. Levels are not
uniform grids; kernels compute them as base plus planes, or dequantize.

Knows nothing about files, kernels or the engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moestream.convert.codecs.base import (
    Codec, EncodedTensor, as_torch, check_weight, group_weights, pack_bits, store_scale, unpack_bits,
    unpack_bits_torch,
)


class ResidualCodec(Codec):
    """Base INT-``base_bits`` plus ``n_planes`` sign planes (levels base_bits .. base_bits+n_planes).

    Args:
        base_bits: bits of the base quantizer (1..8); D²MoE V1 = 2, V2 = 5.
        n_planes: number of 1-bit residual planes (V1: 2 -> levels 2/3/4; V2: 3 -> 5..8).
        scale_dtype: "f16" or "f32" storage of s1 and s_k.
        act_weighted: use act_scale (when given to encode) for the plane scales.
    """

    name = "residual"

    def __init__(self, base_bits: int = 2, n_planes: int = 2, scale_dtype: str = "f16",
                 act_weighted: bool = True) -> None:
        if not 1 <= int(base_bits) <= 8:
            raise ValueError(f"base_bits must be in 1..8, got {base_bits}")
        if int(n_planes) < 0:
            raise ValueError(f"n_planes must be >= 0, got {n_planes}")
        self.base_bits = int(base_bits)
        self.n_planes = int(n_planes)
        self.scale_dtype = scale_dtype
        self.act_weighted = bool(act_weighted)

    @property
    def level_bits(self) -> tuple[int, ...]:
        return tuple(self.base_bits + k for k in range(self.n_planes + 1))

    @property
    def params(self) -> dict[str, Any]:
        return {"base_bits": self.base_bits, "n_planes": self.n_planes,
                "scale_dtype": self.scale_dtype, "act_weighted": self.act_weighted}

    def stored_bits_per_weight(self, level: int, group_size: int, scale_bytes: int | None = None) -> float:
        sb = scale_bytes if scale_bytes is not None else (2 if self.scale_dtype == "f16" else 4)
        return self.base_bits + 8.0 * (sb + 1) / group_size + (level - 1) * (1 + 8.0 * sb / group_size)

    def encode(self, weight: np.ndarray, group_size: int,
               act_scale: np.ndarray | None = None) -> EncodedTensor:
        w = check_weight(weight, group_size, act_scale)
        R, C = w.shape
        G = C // group_size
        wg = w.reshape(R, G, group_size)
        qmax = (1 << self.base_bits) - 1
        lo = np.minimum(wg.min(axis=2), 0.0).astype(np.float64)
        hi = np.maximum(wg.max(axis=2), 0.0).astype(np.float64)
        s1 = store_scale((hi - lo) / qmax, self.scale_dtype)
        z1 = np.clip(np.round(-lo / s1.astype(np.float64)), 0, qmax).astype(np.int32)
        q1 = np.clip(np.round(wg / s1.astype(np.float32)[:, :, None]).astype(np.int32) + z1[:, :, None], 0, qmax)
        segments = [{"scale": s1, "zero": z1.astype(np.uint8),
                     "plane1": pack_bits(q1.reshape(-1), self.base_bits)}]
        w_hat = self._base(q1, s1, z1)
        h = group_weights(act_scale, R, C, group_size) if (act_scale is not None and self.act_weighted) else None
        for k in range(self.n_planes):
            res = wg - w_hat
            bit = (res >= 0).astype(np.uint8)
            if h is None:
                s = np.abs(res).astype(np.float64).mean(axis=2)
            else:
                hb = np.broadcast_to(h, res.shape)
                s = (hb * np.abs(res)).sum(axis=2) / np.maximum(hb.sum(axis=2), 1e-30)
            sk = store_scale(s, self.scale_dtype)
            segments.append({"scale": sk, f"plane{k + 2}": pack_bits(bit.reshape(-1), 1)})
            w_hat = self._add_plane(w_hat, bit, sk)
        return EncodedTensor(codec=self.name, params=self.params, shape=(R, C), group_size=group_size,
                             segments=segments)

    # --------------------------------------------------------------- reference (numpy)
    @staticmethod
    def _base(q1: np.ndarray, s1: np.ndarray, z1: np.ndarray) -> np.ndarray:
        return s1.astype(np.float32)[:, :, None] * (q1 - z1[:, :, None]).astype(np.float32)

    @staticmethod
    def _add_plane(w_hat: np.ndarray, bit: np.ndarray, sk: np.ndarray) -> np.ndarray:
        sign = np.where(bit.astype(bool), np.float32(1.0), np.float32(-1.0))
        return w_hat + sk.astype(np.float32)[:, :, None] * sign

    def reference_decode(self, enc: EncodedTensor, level: int) -> np.ndarray:
        R, C = enc.shape
        G = C // enc.group_size
        seg0 = enc.segments[0]
        q1 = unpack_bits(seg0["plane1"], self.base_bits, R * C).astype(np.int32).reshape(R, G, -1)
        w_hat = self._base(q1, np.asarray(seg0["scale"]), np.asarray(seg0["zero"], dtype=np.int32))
        for k in range(1, level):
            seg = enc.segments[k]
            bit = unpack_bits(seg[f"plane{k + 1}"], 1, R * C).reshape(R, G, -1)
            w_hat = self._add_plane(w_hat, bit, np.asarray(seg["scale"]))
        return w_hat.reshape(R, C)

    # --------------------------------------------------------------- fast (torch)
    def torch_decode(self, enc: EncodedTensor, level: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        R, C = enc.shape
        G = C // enc.group_size
        seg0 = enc.segments[0]
        q1 = unpack_bits_torch(as_torch(seg0["plane1"]), self.base_bits, R * C).view(R, G, -1)
        z1 = as_torch(seg0["zero"]).to(torch.int32)
        s1 = as_torch(seg0["scale"]).to(torch.float32)
        if out is None:
            out = torch.empty((R, C), dtype=torch.float32, device=s1.device)
        ov = out.view(R, G, -1)
        ov.copy_(q1)
        ov.sub_(z1[:, :, None])  # exact: small integers
        ov.mul_(s1[:, :, None])
        for k in range(1, level):
            seg = enc.segments[k]
            bit = unpack_bits_torch(as_torch(seg[f"plane{k + 1}"]), 1, R * C).view(R, G, -1)
            sk = as_torch(seg["scale"]).to(torch.float32)[:, :, None]
            # Ŵ += s_k·(±1): sign applied to the (exact) product, one rounding in the add
            ov.add_(torch.where(bit.bool(), sk, -sk))
        return out

    def plane_terms(self, enc: EncodedTensor, level: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Integer terms for plane-sum kernels: Ŵ_level = Σ_t scale_t·(codes_t − zero_t) per group.

        Returns:
            list of (codes uint8 [rows, cols], scale fp32 [rows, G], zero fp32 [rows, G]) — the base
            (codes Q1, s1, z1) then each sign plane as codes {0,1}, scale 2·s_k, zero 0.5.
        """
        R, C = enc.shape
        seg0 = enc.segments[0]
        terms = [(unpack_bits(seg0["plane1"], self.base_bits, R * C).reshape(R, C),
                  np.asarray(seg0["scale"], dtype=np.float32),
                  np.asarray(seg0["zero"], dtype=np.float32))]
        for k in range(1, level):
            seg = enc.segments[k]
            bit = unpack_bits(seg[f"plane{k + 1}"], 1, R * C).reshape(R, C)
            sk = np.asarray(seg["scale"], dtype=np.float32)
            terms.append((bit, 2 * sk, np.full_like(sk, 0.5)))
        return terms
