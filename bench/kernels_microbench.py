"""Microbenchmark: one Qwen3-30B-A3B-sized expert FFN per codec level and kernel.

Owns the kernel measurement behind engine/kernels.py's PREFERENCE table:
gate/up [768, 2048], down [2048, 768] (H = 2048, I = 768), batch 1 (decode)
and batch 32 (prefill-like), 2 threads, every (codec, level, kernel) case run
in interleaved rounds (shuffled order per round) and reported as
median/min/max microseconds per expert call. Each case cycles over enough
copies of the expert (≥ ~160 MB held) that weights come from memory, not
cache. Roofline: bytes a call must read (fp32 weights, or the kernel's held
bytes) divided by the measured read bandwidth (best of several 256 MB sums).

Writes bench/results/kernels_microbench.json (torch version, CPU model, git
commit, load average before/after — other jobs may share the CPU) and a
Markdown table next to it, and prints one JSON summary line.

Knows nothing about models or files beyond the codecs and kernels it times.
Run: ``python -m moestream.bench.kernels_microbench`` (or the file path).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from moestream.bench.harness import cpu_model
from moestream.convert.codecs import get_codec
from moestream.engine import kernels as K

H, I = 2048, 768
RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """HEAD commit of the repository holding this file ('unknown' outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_bandwidth(mbytes: int = 256, reps: int = 5) -> float:
    """Best observed read bandwidth (bytes/s) summing an fp32 array of ``mbytes`` MB."""
    t = torch.ones(mbytes * (1 << 20) // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best


def build_expert(codec: str, seed: int = 0):
    """Encode one synthetic expert (Student-t weights; min-max ranges — speed does not depend on them)."""
    rng = np.random.default_rng(seed)
    c = get_codec(codec, search=False) if codec.startswith("matryoshka") else get_codec(codec)
    mk = lambda r, k: (rng.standard_t(5, (r, k)) * 0.02).astype(np.float32)  # noqa: E731
    return {"gate_proj": c.encode(mk(I, H), 128), "up_proj": c.encode(mk(I, H), 128),
            "down_proj": c.encode(mk(H, I), 128)}


def make_cases(target_bytes: int) -> list[dict]:
    """Every supported (codec, level, kernel), each with enough prepared copies to exceed caches."""
    cases = []
    seen_fp32 = False
    for codec in ("matryoshka", "matryoshka_floor", "residual"):
        enc = build_expert(codec)
        bits = enc["gate_proj"].codec_obj().level_bits
        for level in range(1, len(bits) + 1):
            for kname in K.KERNELS:
                if K.kernel_reason(kname, enc, level) is not None:
                    continue
                if kname == "fp32":
                    if seen_fp32:
                        continue  # fp32 cost does not depend on codec or level
                    seen_fp32 = True
                first = K.prepare(enc, level, kname)
                copies = max(2, min(64, -(-target_bytes // max(first.nbytes, 1))))
                views = [first] + [K.prepare(enc, level, kname) for _ in range(copies - 1)]
                label = "fp32 (unquantized)" if kname == "fp32" else f"{codec} L{level} ({bits[level - 1]}b)"
                stored = sum(e.nbytes(level) for e in enc.values())
                cases.append({"case": f"{label} / {kname}", "codec": None if kname == "fp32" else codec,
                              "level": None if kname == "fp32" else level,
                              "bits": 32 if kname == "fp32" else bits[level - 1], "kernel": kname,
                              "stored_bytes": 3 * I * H * 4 if kname == "fp32" else stored,
                              "held_bytes": first.nbytes, "copies": copies,
                              "prepare_ms": 1e3 * statistics.median(v.prepare_s for v in views),
                              "views": views})
    return cases


def time_case(views: list, x: torch.Tensor) -> float:
    """Seconds per expert call, averaged over one pass through the copies."""
    t0 = time.perf_counter()
    for v in views:
        K.run_expert(v, x)
    return (time.perf_counter() - t0) / len(views)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON document it writes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--target-mb", type=int, default=160)
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels_microbench.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bw = read_bandwidth()
    cases = make_cases(args.target_mb << 20)
    rng = random.Random(0)
    xs = {b: torch.randn(b, H) for b in args.batches}
    samples: dict[tuple[str, int], list[float]] = {(c["case"], b): [] for c in cases for b in args.batches}
    for c in cases:  # warm-up
        for b in args.batches:
            K.run_expert(c["views"][0], xs[b])
    for _ in range(args.rounds):
        order = [(c, b) for c in cases for b in args.batches]
        rng.shuffle(order)
        for c, b in order:
            samples[(c["case"], b)].append(time_case(c["views"], xs[b]))
    fp32_bytes = 3 * I * H * 4
    rows = []
    for c in cases:
        for b in args.batches:
            s = samples[(c["case"], b)]
            med = statistics.median(s)
            rows.append({k: v for k, v in c.items() if k != "views"} | {
                "batch": b, "median_us": 1e6 * med, "min_us": 1e6 * min(s), "max_us": 1e6 * max(s),
                "fp32_roofline_us": 1e6 * fp32_bytes / bw,
                "own_roofline_us": 1e6 * c["held_bytes"] / bw,
                "achieved_GBps_held": c["held_bytes"] / med / 1e9,
            })
    doc = {
        "benchmark": "kernels_microbench", "expert": {"H": H, "I": I, "group_size": 128},
        "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
        "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git_commit": git_commit(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "note": "CPU shared with other jobs (see loadavg); timings are interleaved to share the noise.",
        "read_bandwidth_GBps": bw / 1e9, "fp32_expert_bytes": fp32_bytes, "results": rows,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc))
    best = {b: min((r for r in rows if r["batch"] == b and r["kernel"] != "fp32"),
                   key=lambda r: r["median_us"])["case"] for b in args.batches}
    print(json.dumps({"benchmark": "kernels_microbench", "read_bandwidth_GBps": round(bw / 1e9, 2),
                      "fastest_quantized": best, "out": str(args.out)}))
    return doc


def markdown(doc: dict) -> str:
    """The results as a Markdown table."""
    lines = [
        f"# Expert FFN kernels (H={H}, I={I}, group 128) — {doc['cpu_model']}, {doc['threads']} threads",
        "",
        f"torch {doc['torch']} ({doc['cpu_capability']}), commit {doc['git_commit'][:10]}, "
        f"{doc['rounds']} interleaved rounds, read bandwidth {doc['read_bandwidth_GBps']:.1f} GB/s, "
        f"load average before/after {doc['loadavg_before'][0]:.2f}/{doc['loadavg_after'][0]:.2f} "
        "(CPU shared with other jobs).",
        f"fp32 roofline (fp32 expert bytes / bandwidth): {doc['results'][0]['fp32_roofline_us']:.0f} µs.",
        "",
        "| case | batch | median µs | min | max | held MB | own roofline µs | × fp32 roofline | prepare ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        lines.append(f"| {r['case']} | {r['batch']} | {r['median_us']:.0f} | {r['min_us']:.0f} | "
                     f"{r['max_us']:.0f} | {r['held_bytes'] / 1e6:.2f} | {r['own_roofline_us']:.0f} | "
                     f"{r['median_us'] / r['fp32_roofline_us']:.2f} | {r['prepare_ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
