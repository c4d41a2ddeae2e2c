"""Sweep the consistency policy's settings on a recorded routing trace, beside LRU, LFU, SCH and Belady.

Usage::

    python bench/policy_sweep.py TRACE.npz --rho 1 2 4 8 --out sweep.json

For each cache size rho and scope (one cache per layer, or one shared by all
layers as the engine's arena is), prints every hit rate and its share of
Belady's, for the observed trace and its time-shuffled baseline, and writes
them as JSON. Settings swept: window length in tokens and ``frequency_weight``
(the long-run-share term of ``ConsistencyPolicy``). Imports only the scheduler.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from moestream.scheduler.policies import ConsistencyPolicy, LFUPolicy, LRUPolicy
from moestream.scheduler.simulate import RoutingTrace, shuffle_trace, simulate_belady, simulate_policy, simulate_sch

WINDOWS = (4, 8, 16, 64)
FREQUENCY_WEIGHTS = (0.0, 1.0, 4.0)


def rate(trace: RoutingTrace, scope: str, run) -> float:
    """Mean hit rate over sequences (and layers for the per-layer scope); ``run(tokens, n_layers_sharing)``."""
    rates = []
    if scope == "layer":
        for layer in range(trace.n_layers):
            for s in range(trace.n_sequences):
                tokens = trace.layer_tokens(s, layer)
                rates.append(run(tokens, 1) / tokens.size)
    else:
        for s in range(trace.n_sequences):
            tokens = trace.model_tokens(s)
            rates.append(run(tokens, trace.n_layers) / tokens.size)
    return float(np.mean(rates))


def sweep(trace: RoutingTrace, rho: int, scope: str) -> dict[str, float]:
    """Hit rates of every policy and setting at one cache size and scope."""
    k = trace.top_k
    res = {
        "belady": rate(trace, scope, lambda t, n: simulate_belady(t, rho * k * n)),
        "sch16": rate(trace, scope, lambda t, n: simulate_sch(t, rho * k * n, 16)),
        "lru": rate(trace, scope, lambda t, n: simulate_policy(t, rho * k * n, LRUPolicy())),
        "lfu": rate(trace, scope, lambda t, n: simulate_policy(t, rho * k * n, LFUPolicy())),
    }
    for w in WINDOWS:
        for fw in FREQUENCY_WEIGHTS:
            res[f"consistency_w{w}_f{fw:g}"] = rate(trace, scope, lambda t, n, w=w, fw=fw: simulate_policy(
                t, rho * k * n, ConsistencyPolicy(window=w * k * n, frequency_weight=fw)))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--rho", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--scope", nargs="+", default=["layer", "model"])
    p.add_argument("--out")
    args = p.parse_args()
    trace = RoutingTrace.load(args.trace)
    shuffled = shuffle_trace(trace, 0)
    out: dict = {"trace": args.trace, "windows_tokens": list(WINDOWS), "frequency_weights": list(FREQUENCY_WEIGHTS),
                 "results": {}}
    for rho in args.rho:
        for scope in args.scope:
            for label, tr in (("observed", trace), ("shuffled", shuffled)):
                res = sweep(tr, rho, scope)
                out["results"][f"rho{rho}/{scope}/{label}"] = res
                b = res["belady"]
                best = max((v, n) for n, v in res.items() if n.startswith("consistency"))
                print(f"rho={rho} {scope:5} {label:8} belady {100 * b:5.1f} | lru {100 * res['lru']:5.1f} "
                      f"lfu {100 * res['lfu']:5.1f} sch16 {100 * res['sch16']:5.1f} | consistency w4 "
                      f"{100 * res['consistency_w4_f0']:5.1f} | best {best[1]} {100 * best[0]:5.1f} "
                      f"({100 * best[0] / b:.1f}% of Belady)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
