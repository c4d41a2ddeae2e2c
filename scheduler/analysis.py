"""Routing-consistency analysis of a trace: SRP, hit-rate curves, shuffled baselines, cache sizing.

Owns the numbers of the routing-consistency spec: SRP (threshold
formulation, model and layer pooling), hit rates of LRU / LFU / the
consistency policy / SCH(m) / Belady over cache sizes rho = 1..E/k (per-layer
caches and one model-level cache), every number beside its time-shuffled
baseline, a knee-of-curve cache-size recommendation, a text report and a
plot. Knows nothing about models or the runtime; it reads RoutingTrace only.

SCH follows the spec's pseudo-code (no pinning, hits counted at the start
of a token), so on rare traces it can exceed Belady, which is computed
under demand-paging rules (see simulate.py); the online policies cannot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .simulate import RoutingTrace, policy_hits, shuffle_trace

DEFAULT_SEGMENT_LENGTHS = (4, 16, 64, 256)
DEFAULT_POLICIES = ("lru", "lfu", "consistency", "sch", "belady")
OWN_POLICY = "consistency"


@dataclass(frozen=True)
class SRPResult:
    """SRP, its optimal threshold alpha* and the size ratio P(alpha*)/A."""

    srp: float
    alpha: int
    size_ratio: float


def window_histogram(tokens: np.ndarray, n_experts: int, m: int) -> np.ndarray:
    """hist[v] = number of (stride-1 window of length m, expert) pairs with f == v.

    Args:
        tokens: [T, k] expert ids of one sequence and layer.
        n_experts: E.
        m: segment length; sequences shorter than m contribute nothing.

    Returns:
        int64 array of length m + 1.
    """
    T = tokens.shape[0]
    hist = np.zeros(m + 1, dtype=np.int64)
    if T < m:
        return hist
    onehot = np.zeros((T + 1, n_experts), dtype=np.int64)  # row 0 = zeros for the prefix sum
    rows = np.repeat(np.arange(1, T + 1), tokens.shape[1])
    np.add.at(onehot, (rows, tokens.reshape(-1)), 1)
    prefix = np.cumsum(onehot, axis=0)  # [T+1, E]
    f = prefix[m:] - prefix[:-m]  # [T-m+1, E] activations per window and expert
    return hist + np.bincount(f.reshape(-1), minlength=m + 1)


def srp_from_histogram(hist: np.ndarray, m: int) -> SRPResult:
    """Best micro-F1 of a threshold segment router (the spec's formulation).

    Args:
        hist: window histogram (length m + 1).
        m: segment length.

    Returns:
        SRPResult; srp is nan when there are no activations.
    """
    v = np.arange(m + 1)
    total_activations = float((v * hist).sum())  # A
    if total_activations == 0:
        return SRPResult(float("nan"), 0, float("nan"))
    tp = np.cumsum((v * hist)[::-1])[::-1].astype(float)  # TP(alpha) = sum_{v>=alpha} v hist[v]
    predicted = m * np.cumsum(hist[::-1])[::-1].astype(float)  # P(alpha)
    f1 = 2.0 * tp / (predicted + total_activations)
    alpha = int(np.argmax(f1))
    return SRPResult(float(f1[alpha]), alpha, float(predicted[alpha] / total_activations))


def layer_histogram(trace: RoutingTrace, layer: int, m: int) -> np.ndarray:
    """Histogram pooled over all sequences for one layer."""
    hist = np.zeros(m + 1, dtype=np.int64)
    for s in range(trace.n_sequences):
        hist += window_histogram(trace.layer_tokens(s, layer), trace.n_experts, m)
    return hist


def srp(trace: RoutingTrace, m: int) -> dict:
    """SRP per layer (one threshold per layer) and for the model (one threshold).

    Args:
        trace: the routing trace.
        m: segment length.

    Returns:
        ``{"model": float, "alpha": int, "size_ratio": float, "per_layer": [float]}``.
    """
    hists = [layer_histogram(trace, layer, m) for layer in range(trace.n_layers)]
    model = srp_from_histogram(np.sum(hists, axis=0), m)
    return {"model": model.srp, "alpha": model.alpha, "size_ratio": model.size_ratio,
            "per_layer": [srp_from_histogram(h, m).srp for h in hists]}


def hit_rate(trace: RoutingTrace, policy: str, rho: int, scope: str = "layer",
             m: int = 16, window_tokens: int = 4) -> float:
    """Mean hit rate (per sequence, then over layers) of a simulator at cache size rho.

    Args:
        trace: the routing trace.
        policy: lru | lfu | consistency | sch | belady.
        rho: cache size in units of active experts (C = rho*k per layer, or rho*L*k for the model).
        scope: "layer" (one cache per layer) or "model" (one cache shared by all layers).
        m: SCH's segment length.
        window_tokens: the consistency policy's window, in tokens.

    Returns:
        Hit rate in [0, 1] (nan for an empty trace).

    Raises:
        ValueError: unknown scope.
    """
    k, L = trace.top_k, trace.n_layers
    rates = []
    if scope == "layer":
        for layer in range(L):
            for s in range(trace.n_sequences):
                tokens = trace.layer_tokens(s, layer)
                if len(tokens):
                    h = policy_hits(policy, tokens, rho * k, m=m, window=window_tokens * k)
                    rates.append(h / tokens.size)
    elif scope == "model":
        for s in range(trace.n_sequences):
            tokens = trace.model_tokens(s)
            if len(tokens):
                h = policy_hits(policy, tokens, rho * L * k, m=m, window=window_tokens * L * k)
                rates.append(h / tokens.size)
    else:
        raise ValueError(f"scope must be 'layer' or 'model', got {scope!r}")
    return float(np.mean(rates)) if rates else float("nan")


def knee(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Knee of an increasing, flattening curve (Kneedle: max of normalized y - x).

    Args:
        xs: increasing x values (>= 1 point).
        ys: curve values.

    Returns:
        The x at the knee (the first x when the curve is flat or too short).
    """
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 3 or not np.isfinite(y).all() or y.max() - y.min() <= 1e-12:
        return float(x[0])
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y.min()) / (y.max() - y.min())
    return float(x[int(np.argmax(yn - xn))])


def routing_load(trace: RoutingTrace) -> dict:
    """Per-layer share of the busiest expert and its ratio to the uniform share 1/E."""
    shares = []
    for layer in range(trace.n_layers):
        counts = np.zeros(trace.n_experts, dtype=np.int64)
        for s in range(trace.n_sequences):
            counts += np.bincount(trace.layer_tokens(s, layer).reshape(-1), minlength=trace.n_experts)
        total = counts.sum()
        shares.append(float(counts.max() / total) if total else float("nan"))
    return {"busiest_share_per_layer": shares,
            "busiest_over_uniform_per_layer": [s * trace.n_experts for s in shares]}


def analyze(
    trace: RoutingTrace,
    segment_lengths: Sequence[int] = DEFAULT_SEGMENT_LENGTHS,
    sch_m: int = 16,
    rhos: Sequence[int] | None = None,
    policies: Sequence[str] = DEFAULT_POLICIES,
    scopes: Sequence[str] = ("layer", "model"),
    window_tokens: int = 4,
    shuffle_seed: int = 0,
) -> dict:
    """The full routing-consistency report, each number beside its shuffled baseline.

    Args:
        trace: the routing trace.
        segment_lengths: SRP segment lengths m.
        sch_m: SCH's segment length.
        rhos: cache sizes (default 1..E/k).
        policies: simulators to run.
        scopes: "layer" and/or "model" caches.
        window_tokens: the consistency policy's window in tokens.
        shuffle_seed: seed of the time-shuffled baseline.

    Returns:
        A JSON-ready dict (see ``format_report`` for the fields).
    """
    shuffled = shuffle_trace(trace, shuffle_seed)
    rhos = list(rhos) if rhos is not None else list(range(1, trace.n_experts // trace.top_k + 1))
    report: dict = {
        "trace": {"n_layers": trace.n_layers, "n_experts": trace.n_experts, "top_k": trace.top_k,
                  "n_sequences": trace.n_sequences,
                  "n_tokens": int(sum(a.shape[1] for a in trace.ids)), "meta": trace.meta},
        "load": routing_load(trace),
        "srp": {},
        "hit_rate": {},
        "settings": {"sch_m": sch_m, "window_tokens": window_tokens, "shuffle_seed": shuffle_seed,
                     "rhos": rhos},
    }
    for m in segment_lengths:
        report["srp"][str(m)] = {"observed": srp(trace, m), "shuffled": srp(shuffled, m)}
    for scope in scopes:
        curves: dict = {}
        for name in policies:
            curves[name] = {
                "observed": [hit_rate(trace, name, r, scope, sch_m, window_tokens) for r in rhos],
                "shuffled": [hit_rate(shuffled, name, r, scope, sch_m, window_tokens) for r in rhos],
            }
        if "belady" in curves:
            for name, c in curves.items():
                c["percent_of_belady"] = [100.0 * h / b if b > 0 else float("nan")
                                          for h, b in zip(c["observed"], curves["belady"]["observed"])]
        report["hit_rate"][scope] = curves
    report["recommendation"] = _recommend(report, trace, rhos, policies)
    return report


def _recommend(report: dict, trace: RoutingTrace, rhos: list[int], policies: Sequence[str]) -> dict:
    scope = "layer" if "layer" in report["hit_rate"] else next(iter(report["hit_rate"]), None)
    if scope is None or not policies:
        return {}
    name = OWN_POLICY if OWN_POLICY in policies else policies[0]
    curve = report["hit_rate"][scope][name]["observed"]
    rho = knee(rhos, curve)
    i = rhos.index(int(rho))
    return {"policy": name, "scope": scope, "rho": int(rho),
            "experts_per_layer": int(rho) * trace.top_k, "hit_rate": curve[i],
            "hit_rate_shuffled": report["hit_rate"][scope][name]["shuffled"][i],
            "method": "knee (Kneedle) of the hit-rate curve over rho"}


def format_report(report: dict) -> str:
    """Plain-text summary of ``analyze``'s report."""
    t = report["trace"]
    lines = [f"trace: {t['n_sequences']} sequences, {t['n_tokens']} tokens, L={t['n_layers']} "
             f"E={t['n_experts']} k={t['top_k']}",
             "busiest expert / uniform share per layer: "
             + " ".join(f"{x:.2f}" for x in report["load"]["busiest_over_uniform_per_layer"]),
             "", "SRP (observed | time-shuffled baseline)"]
    for m, r in report["srp"].items():
        o, s = r["observed"], r["shuffled"]
        lines.append(f"  m={m:>4}: model {_pct(o['model'])} | {_pct(s['model'])}   per layer "
                     + " ".join(_pct(x) for x in o["per_layer"]))
    rhos = report["settings"]["rhos"]
    for scope, curves in report["hit_rate"].items():
        lines += ["", f"hit rate, {scope}-level cache (observed | shuffled); rho = " + " ".join(map(str, rhos))]
        for name, c in curves.items():
            cells = " ".join(f"{_pct(o)}|{_pct(s)}" for o, s in zip(c["observed"], c["shuffled"]))
            lines.append(f"  {name:<12} {cells}")
    rec = report.get("recommendation")
    if rec:
        lines += ["", f"recommended cache: rho={rec['rho']} ({rec['experts_per_layer']} experts per layer), "
                  f"{rec['policy']} hit rate {_pct(rec['hit_rate'])} (shuffled {_pct(rec['hit_rate_shuffled'])})"]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "  n/a" if x is None or not np.isfinite(x) else f"{100 * x:5.1f}"


def save_report(report: dict, out_dir: str | Path, plot: bool = True) -> list[Path]:
    """Write ``report.json`` (and ``hit_rate.png`` when matplotlib is installed).

    Args:
        report: from ``analyze``.
        out_dir: folder (created).
        plot: also draw the hit-rate curves.

    Returns:
        Paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    written[0].write_text(json.dumps(report, indent=1, default=float))
    if plot:
        png = plot_report(report, out / "hit_rate.png")
        if png is not None:
            written.append(png)
    return written


def plot_report(report: dict, path: str | Path) -> Path | None:
    """Hit rate vs rho per policy (solid) and shuffled baseline (dashed); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scopes = list(report["hit_rate"])
    fig, axes = plt.subplots(1, len(scopes), figsize=(6 * len(scopes), 4), squeeze=False)
    rhos = report["settings"]["rhos"]
    for ax, scope in zip(axes[0], scopes):
        for name, c in report["hit_rate"][scope].items():
            line, = ax.plot(rhos, c["observed"], marker="o", label=name)
            ax.plot(rhos, c["shuffled"], linestyle="--", color=line.get_color(), alpha=0.6)
        ax.set_xlabel("cache size rho (x active experts)")
        ax.set_ylabel("hit rate")
        ax.set_title(f"{scope}-level cache (dashed: time-shuffled)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
