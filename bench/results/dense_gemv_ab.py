"""Same-process A/B of the dense Q4_0/Q8_0 kernel (engine/dense_kernels_src.py): revision REV's C source
("before") vs the working tree's ("after"), and ggml's own kernel (bench/native_gemv.ggml_case).

Each arm cycles over enough weight copies to exceed the LLC (cold, as in decode); the arms run interleaved
in every round and the medians are reported. Both dense arms are bare ctypes calls (arguments prepared
beforehand), ggml goes through ggml_graph_compute_with_ctx. AB_VARIANTS="NAME NAME=VAL A+B" adds arms built
from the working tree's source with those #defines prepended (for trying kernel variants).

    python bench/results/dense_gemv_ab.py --rev HEAD~1 --rounds 9 --out bench/results/dense_gemv_ab.json
"""
import argparse, ctypes, json, os, statistics, subprocess, sys, time
import numpy as np, torch
from moestream.engine import dense_kernels as dk
from moestream.convert.native_build import build_first_working, find_compiler
from moestream.bench import native_gemv as ng

def source_at(rev):
    text = subprocess.run(["git", "show", f"{rev}:engine/dense_kernels_src.py"], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, check=True).stdout
    ns = {}; exec(text, ns); return ns["C_SOURCE"]

def build(tag, src):
    lib, err = build_first_working(f"dense_ab_{tag}", src, dk._CFLAGS, dk._VARIANTS[:1], find_compiler(), dk._load, lambda _: None)
    assert lib is not None, err
    return lib

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="HEAD"); ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16]); ap.add_argument("--cold-mb", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1); ap.add_argument("--out")
    ap.add_argument("--shapes", default="4096x2048,512x2048,2048x4096,768x2048,2048x768")
    a = ap.parse_args()
    from moestream.engine.dense_kernels_src import C_SOURCE
    libs = {"before": build("base_" + a.rev.replace("/", "_"), source_at(a.rev)), "after": build("new", C_SOURCE)}
    for v in os.environ.get("AB_VARIANTS", "").split():
        libs[v] = build("v" + v, "".join((f"#define {d.replace('=', ' ')}\n" if "=" in d else f"#define {d} 1\n") for d in v.split("+")) + C_SOURCE)
    ggml = ng.load_ggml()
    torch.manual_seed(0)
    rows = []
    for shape in a.shapes.split(","):
        n, k = map(int, shape.split("x"))
        for m in a.tokens:
            for kind in ("q4_0", "q8_0"):
                x = torch.randn(m, k)
                p0 = dk.quantize(torch.randn(n, k) * 0.02, kind)
                cp = max(2, (a.cold_mb << 20) // p0.nbytes + 1)
                packs = [dk.PackedDense(kind, p0.qs.clone(), p0.d.clone(), p0.shape) for _ in range(cp)]
                y = torch.empty(m, n); ref = dk.reference_linear(x, p0)
                arms = {}
                for name, lib in libs.items():
                    args = [(DK, p.qs.data_ptr(), p.d.data_ptr(), n, k, x.data_ptr(), m, y.data_ptr(), a.threads)
                            for p, DK in ((p, dk.DENSE_KINDS.index(kind)) for p in packs)]
                    f = lib.dq_linear
                    arms[name] = [(lambda ar=ar, f=f: f(*ar)) for ar in args]
                    f(*args[0]); err = float((y - ref).abs().max() / ref.abs().max())
                    assert err < 1e-4, (name, err)
                if ggml is not None:
                    calls, nb, ctx = ng.ggml_case(ggml, kind.upper(), n, k, x, cp, a.threads, 4 + a.rounds * (cp + 8) * 2)
                    arms["ggml"] = calls
                t = {nm: [] for nm in arms}
                for _ in range(a.rounds):
                    for nm, calls in arms.items():
                        for c in calls[:2]: c()
                        t0 = time.perf_counter()
                        for c in calls: c()
                        t[nm].append((time.perf_counter() - t0) / len(calls) * 1e6)
                r = {"n": n, "k": k, "m": m, "kind": kind, "copies": cp, "weight_bytes": p0.nbytes,
                     **{f"{nm}_us": statistics.median(v) for nm, v in t.items()}, "samples_us": t}
                rows.append(r)
                g = r.get("ggml_us")
                print(" ".join(f"{nm}={statistics.median(v):.0f}" for nm, v in t.items()))
                print(f"{n}x{k} M={m} {kind}: before {r['before_us']:.1f} after {r['after_us']:.1f} ggml {g and round(g,1)} "
                      f"after/before {r['after_us']/r['before_us']:.2f} after/ggml {g and round(r['after_us']/g,2)}", flush=True)
    doc = {"rev": subprocess.run(["git", "rev-parse", "--short=7", a.rev], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
           "cpu": ng.cpu_model() if hasattr(ng, "cpu_model") else "", "ggml": ggml is not None, "threads": a.threads, "rounds": a.rounds, "cold_mb": a.cold_mb, "rows": rows}
    if a.out: json.dump(doc, open(a.out, "w"), indent=1)

main()
