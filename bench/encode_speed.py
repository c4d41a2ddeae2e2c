"""Benchmark: nested-codec encode time per Qwen3-30B-A3B-shaped expert, fast vs reference encoder.

Owns one measurement: one expert = gate/up [768, 2048] and down [2048, 768]
(H = 2048, I = 768), random weights (Gaussian ×0.02 with 2 % of input
channels ×8, like a trained matrix's outlier channels), group size 128. For
each codec it times the straightforward encoder (``encode_reference``: every
range candidate evaluated on the whole matrix with numpy) and the fast one
(``encode``, convert/codecs/range_search.py) with each available backend,
and checks the bytes are identical. Reported per expert and per matrix shape
(median of ``--repeat`` runs; the reference once, it is slow).

Writes bench/results/encode_speed.json (CPU, threads, load average — other
jobs may share the CPU) and encode_speed.md, and prints one JSON summary line.
Knows nothing about models or files. Run: ``python -m moestream.bench.encode_speed``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moestream.bench.harness import cpu_model
from moestream.bench.kernels_microbench import git_commit
from moestream.convert.codecs import get_codec, range_search

H, I, GS = 2048, 768, 128
SHAPES = {"gate/up [768x2048]": (I, H), "down [2048x768]": (H, I)}
RESULTS = Path(__file__).resolve().parent / "results"


def expert_weight(rows: int, cols: int, seed: int) -> np.ndarray:
    """One synthetic projection with outlier input channels."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 0.02
    w[:, rng.choice(cols, cols // 50, replace=False)] *= 8.0
    return w.astype(np.float32)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_codec(name: str, backends: list[str], repeat: int, reference: bool, threads: int) -> dict[str, Any]:
    """Seconds per matrix shape and per expert for each encoder of one codec, on ``threads`` torch threads."""
    torch.set_num_threads(threads)
    codec = get_codec(name)
    ws = {label: expert_weight(*shape, seed=i) for i, (label, shape) in enumerate(SHAPES.items())}
    row: dict[str, Any] = {"codec": name, "threads": threads}
    encoders: dict[str, Callable[[np.ndarray], Any]] = {}
    if not hasattr(codec, "encode_reference"):  # one encoder only (residual)
        encoders["encode"] = lambda w: codec.encode(w, GS)
    else:
        if reference:
            encoders["reference"] = lambda w: codec.encode_reference(w, GS)
        for b in backends:
            encoders[b] = lambda w, b=b: codec.encode(w, GS, backend=b)
    outs: dict[str, dict[str, Any]] = {}
    for enc_name, fn in encoders.items():
        per: dict[str, float] = {}
        outs[enc_name] = {}
        for label, w in ws.items():
            fn(w[:64])  # warm-up (builds the native kernel once)
            per[label], outs[enc_name][label] = timed(lambda: fn(w), 1 if enc_name == "reference" else repeat)
        per["expert"] = 2 * per["gate/up [768x2048]"] + per["down [2048x768]"]
        row[enc_name] = per
    if "reference" in outs:
        row["bytes_identical"] = all(
            o[label].to_bytes_per_level() == outs["reference"][label].to_bytes_per_level()
            for k, o in outs.items() if k != "reference" for label in ws)
        for k in outs:
            if k != "reference":
                row[f"speedup_{k}"] = row["reference"]["expert"] / row[k]["expert"]
    return row


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Nested-codec encode time per expert (fast vs reference encoder)", "",
        f"One Qwen3-30B-A3B-shaped expert: gate/up [768 x 2048] + down [2048 x 768], group size {GS}, random "
        "weights with outlier channels. `reference` = the straightforward encoder (every range candidate on the "
        "whole matrix in numpy, as before); `native` / `torch` = `encode()` with that range-search backend "
        "(convert/codecs/range_search.py). Bytes of every fast encoding compared with the reference's.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs (load average before "
        f"{m['load_before']}, after {m['load_after']}), torch {m['torch']}, "
        f"numpy {m['numpy']}, commit {m['commit'][:10]}, {m['date']}. Times: median of {result['repeat']} runs "
        "(reference: 1 run).", "",
        "| codec | threads | encoder | gate/up s | down s | s per expert | speed-up | bytes identical |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in result["codecs"]:
        for enc in [k for k in ("reference", "native", "torch", "encode") if k in row]:
            t = row[enc]
            sp = row.get(f"speedup_{enc}")
            lines.append(f"| {row['codec']} | {row['threads']} | {enc} | {t['gate/up [768x2048]']:.3f} | {t['down [2048x768]']:.3f} | "
                         f"{t['expert']:.3f} | {'' if sp is None else f'{sp:.0f}x'} | "
                         f"{'' if enc == 'reference' else row.get('bytes_identical', '')} |")
    lines += ["", "The 2 cores are shared with other engineers' jobs: the same command varies by about ±30 % between "
              "runs; compare rows of one run. `threads` = torch.get_num_threads() (the native kernel splits groups over "
              "that many threads; the reference encoder is numpy, single-threaded).", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codecs", nargs="+", default=["matryoshka_floor", "matryoshka", "residual"])
    ap.add_argument("--backends", nargs="+", default=None, help="native and/or torch (default: those available)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (one table row each)")
    ap.add_argument("--no-reference", action="store_true", help="skip the slow reference encoder")
    ap.add_argument("--out", type=Path, default=RESULTS / "encode_speed")
    args = ap.parse_args(argv)
    backends = args.backends or (["native"] if range_search.native_kernel() is not None else []) + ["torch"]
    load_before = os.getloadavg()
    rows = [bench_codec(c, backends, args.repeat, not args.no_reference, t) for t in args.threads for c in args.codecs]
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "numpy": np.__version__, "commit": git_commit(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "repeat": args.repeat, "group_size": GS, "codecs": rows,
        "command": "python -m moestream.bench.encode_speed " + " ".join(argv if argv is not None else
                                                                        __import__("sys").argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(json.dumps({"encode_speed": [{"codec": r["codec"], "threads": r["threads"],
                                        **{k: v["expert"] for k, v in r.items() if isinstance(v, dict)}}
                                       for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
