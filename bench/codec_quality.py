"""Codec quality table: relative weight MSE and output error per level, bytes per weight.

Owns the measurement behind docs/codecs.md. Weights: Gaussian [512, 1024],
and a heavy-tailed "real-ish" matrix (Student-t ν=3, 2% of input channels
scaled ×4 as outlier channels — synthetic, not from a checkpoint). Calibration
activations X [1024 tokens, 1024] with log-normal channel scales (hot channels)
give the output error ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² and the diag(XᵀX) weights for the
activation-aware variants. Baselines: independent per-group (128) min-max RTN
at each width, and gguf-py Q8_0 / Q4_0.

Writes bench/results/codec_quality.json and prints one JSON summary line.
Knows nothing about models, files or kernels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from moestream.convert.codecs import dequantize_dense, get_codec, quantize_dense
from moestream.convert.codecs.dense import dense_bits_per_weight

RESULTS = Path(__file__).resolve().parent / "results"
GS = 128


def weights(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Synthetic test matrix ('gaussian' or 'heavy')."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((rows, cols)).astype(np.float32)
    w = rng.standard_t(3, (rows, cols))
    hot = rng.choice(cols, max(1, cols // 50), replace=False)
    w[:, hot] *= 4.0
    return (w * 0.02).astype(np.float32)


def rtn(w: np.ndarray, bits: int, gs: int = GS) -> np.ndarray:
    """Independent per-group asymmetric min-max round-to-nearest at ``bits`` (range includes 0)."""
    R, C = w.shape
    wg = w.reshape(R, C // gs, gs).astype(np.float64)
    lo = np.minimum(wg.min(-1, keepdims=True), 0)
    hi = np.maximum(wg.max(-1, keepdims=True), 0)
    qmax = (1 << bits) - 1
    s = np.maximum((hi - lo) / qmax, 1e-12)
    z = np.round(-lo / s)
    q = np.clip(np.round(wg / s) + z, 0, qmax)
    return ((q - z) * s).reshape(R, C).astype(np.float32)


def rel_mse(w: np.ndarray, wh: np.ndarray) -> float:
    return float(((w - wh) ** 2).sum() / (w ** 2).sum())


def out_err(x: np.ndarray, w: np.ndarray, wh: np.ndarray) -> float:
    y = x @ w.T
    return float(((x @ (w - wh).T) ** 2).sum() / (y ** 2).sum())


def main(argv: list[str] | None = None) -> dict:
    """Measure every codec level and baseline; returns the JSON document it writes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=RESULTS / "codec_quality.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1024, args.cols)) * rng.lognormal(0, 1.0, args.cols)).astype(np.float32)
    act = (x.astype(np.float64) ** 2).sum(0).astype(np.float32)  # diag(XᵀX)
    variants = [
        ("matryoshka (round slice, λ-search)", "matryoshka", {}, False),
        ("matryoshka (round slice, min-max)", "matryoshka", {"search": False}, False),
        ("matryoshka_floor (λ-search)", "matryoshka_floor", {}, False),
        ("matryoshka_floor (min-max)", "matryoshka_floor", {"search": False}, False),
        ("matryoshka_floor (λ-search, unnormalised λ)", "matryoshka_floor", {"normalize": False}, False),
        ("matryoshka (round, λ-search, unnormalised λ)", "matryoshka", {"normalize": False}, False),
        ("matryoshka (round, λ-search, act-weighted)", "matryoshka", {}, True),
        ("residual V1 (INT2 + 2 sign planes)", "residual", {}, False),
        ("residual V1 act-weighted scales", "residual", {}, True),
        ("residual V2 (INT5 + 3 sign planes)", "residual", {"base_bits": 5, "n_planes": 3}, False),
    ]
    rows = []
    for kind in ("gaussian", "heavy"):
        w = weights(kind, args.rows, args.cols)
        for label, name, params, use_act in variants:
            codec = get_codec(name, **params)
            t0 = time.perf_counter()
            enc = codec.encode(w, GS, act_scale=act if use_act else None)
            enc_s = time.perf_counter() - t0
            for lv, bits in enumerate(codec.level_bits, start=1):
                wh = enc.reference_decode(lv)
                rows.append({"weights": kind, "codec": label, "name": name, "params": params,
                             "act_weighted": use_act, "level": lv, "bits": bits,
                             "stored_bpw": enc.nbytes(lv) * 8 / w.size,
                             "rel_mse": rel_mse(w, wh), "rel_out_err": out_err(x, w, wh),
                             "encode_s": enc_s})
        for bits in (2, 3, 4, 5, 8):
            wh = rtn(w, bits)
            rows.append({"weights": kind, "codec": "RTN independent (min-max)", "name": "rtn", "params": {},
                         "act_weighted": False, "level": None, "bits": bits,
                         "stored_bpw": bits + 8.0 * 3 / GS, "rel_mse": rel_mse(w, wh),
                         "rel_out_err": out_err(x, w, wh), "encode_s": 0.0})
        for prec in ("q8_0", "q4_0"):
            wh = dequantize_dense(quantize_dense(w, prec), prec)
            rows.append({"weights": kind, "codec": f"gguf {prec}", "name": prec, "params": {},
                         "act_weighted": False, "level": None, "bits": int(prec[1]),
                         "stored_bpw": dense_bits_per_weight(prec), "rel_mse": rel_mse(w, wh),
                         "rel_out_err": out_err(x, w, wh), "encode_s": 0.0})
    doc = {"benchmark": "codec_quality", "shape": [args.rows, args.cols], "group_size": GS,
           "scales": "f16 scale + u8 zero per group (residual planes: f16 scale)",
           "results": rows, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(json.dumps({"benchmark": "codec_quality", "rows": len(rows), "out": str(args.out)}))
    return doc


def markdown(doc: dict) -> str:
    """Results as Markdown tables (one per weight kind)."""
    out = []
    for kind in ("gaussian", "heavy"):
        out += [f"### {kind} weights {doc['shape']}, group {doc['group_size']}", "",
                "| codec | level | bits | stored bits/weight | rel. weight MSE | rel. output error |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in doc["results"]:
            if r["weights"] == kind:
                out.append(f"| {r['codec']} | {r['level'] or '—'} | {r['bits']} | {r['stored_bpw']:.3f} | "
                           f"{r['rel_mse']:.4g} | {r['rel_out_err']:.4g} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
