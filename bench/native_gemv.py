"""Microbenchmark: one Qwen3-30B-A3B expert projection at each nested level, native kernel vs the rest.

Owns the measurement behind engine/native_kernels.py (issue 9): Y[M, N] = X[M, K] @ Ŵᵀ for the
expert shapes gate/up [768, 2048] and down [2048, 768], M = 1 (decode) and 16 (a prefill chunk),
matryoshka_floor levels 2/4/8 bits (group 128), each computed by

* ``native fp32-act`` / ``native int8-act`` — engine/native_kernels.py straight from the stored planes
                      (reads the stored bytes), with exact fp32 activations or int8 activations
                      (integer dot products; the engine's default);
* ``dense q4_0/q8_0`` — engine/dense_kernels.py, moestream's kernels on llama.cpp's own block formats
                      (the dense matrices of a ``--dense q8_0|q4_0`` conversion);
* ``decode+matmul`` — the codec's torch decode into a reused fp32 buffer, then ``F.linear`` (what a
                      streamed nested expert did on every use before the native kernel);
* ``dequant``       — engine/kernels.py's dequant kernel (codes held unpacked, 1 B/weight, decoded
                      into scratch per call, then ``F.linear``);
* ``fp32``          — ``F.linear`` on fp32 weights (4 B/weight);
* ``ggml Q4_0/Q8_0``— llama.cpp's own CPU kernels (``ggml_mul_mat`` through llama-cpp-python's
                      libggml, activations quantized to Q8 as llama.cpp does), when that library loads;
* ``native int8-act @REV`` — only with ``--baseline REV``: the int8 arm with the nested kernel built
                      from git revision REV's C source (before/after of a kernel change in one run);
* ``native int8-act 1-call`` — only with ``--one-call``: the int8 kernel through a bare ctypes call with the
                      addresses read beforehand, as the ggml arm calls ggml (the ``native`` arms also pay
                      ``set_activation_mode`` and ``linear``'s checks and output allocation, several µs).

Two cache regimes: ``cold`` cycles over enough copies of the weights (>= 3x the last-level cache)
that every call reads them from memory, as a streamed or large model does; ``hot`` repeats one copy.
Cases run in interleaved rounds (shuffled per round) so the shared CPU's noise hits all alike.
Writes bench/results/native_gemv.json and .md and prints one JSON summary line.

Knows nothing about models or files. Run: ``python -m moestream.bench.native_gemv``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from moestream.bench.harness import cpu_model
from moestream.bench.kernels_microbench import git_commit, read_bandwidth
from moestream.convert.codecs import get_codec
from moestream.engine import dense_kernels as dk
from moestream.engine import kernels as K
from moestream.engine import native_kernels as nk

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
SHAPES = ((768, 2048), (2048, 768))  # (N, K): gate/up, down
GROUP = 128
LEVEL_BITS = {1: 2, 2: 4, 3: 8}


# ------------------------------------------------------------------------------------ ggml (llama.cpp)
class _GGMLParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def load_ggml() -> tuple[Any, Any] | None:
    """(libggml-base, libggml-cpu) from llama-cpp-python, or None when they do not load."""
    try:
        import llama_cpp

        d = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        base = ctypes.CDLL(os.path.join(d, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(os.path.join(d, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    except (ImportError, OSError):
        return None
    P = ctypes.c_void_p
    base.ggml_init.argtypes, base.ggml_init.restype = [_GGMLParams], P
    base.ggml_new_tensor_2d.argtypes, base.ggml_new_tensor_2d.restype = [P, ctypes.c_int, ctypes.c_int64,
                                                                         ctypes.c_int64], P
    base.ggml_mul_mat.argtypes, base.ggml_mul_mat.restype = [P, P, P], P
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [P], P
    base.ggml_build_forward_expand.argtypes, base.ggml_build_forward_expand.restype = [P, P], None
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [P], P
    base.ggml_nbytes.argtypes, base.ggml_nbytes.restype = [P], ctypes.c_size_t
    cpu.ggml_graph_compute_with_ctx.argtypes, cpu.ggml_graph_compute_with_ctx.restype = [P, P, ctypes.c_int], ctypes.c_int
    cpu.ggml_cpu_init.argtypes, cpu.ggml_cpu_init.restype = [], None
    cpu.ggml_cpu_init()
    return base, cpu


def ggml_case(libs: tuple[Any, Any], qtype: str, n: int, k: int, x: torch.Tensor, copies: int, threads: int,
              n_calls: int = 0):
    """Callables computing ``x @ Wᵀ`` with ggml on ``copies`` quantized weight copies (one graph each).

    ``n_calls``: how many computes the context must hold (``ggml_graph_compute_with_ctx`` takes each
    call's work buffer, the quantized activations, from the context and never gives it back).
    """
    from gguf import GGMLQuantizationType
    from gguf import quants

    base, cpu = libs
    gtype = {"Q4_0": 2, "Q8_0": 8}[qtype]
    q = quants.quantize((np.random.default_rng(0).standard_normal((n, k)) * 0.02).astype(np.float32),
                        GGMLQuantizationType[qtype])
    m = x.shape[0]
    work = n_calls * (2 * m * k + 4096 * threads)
    ctx = base.ggml_init(_GGMLParams(copies * (q.nbytes + 4 * m * (k + n) + 4096) + work + (64 << 20), None, False))
    xs = np.ascontiguousarray(x.numpy())
    graphs = []
    for _ in range(copies):
        w = base.ggml_new_tensor_2d(ctx, gtype, k, n)
        xt = base.ggml_new_tensor_2d(ctx, 0, k, m)
        assert base.ggml_nbytes(w) == q.nbytes
        ctypes.memmove(base.ggml_get_data(w), q.ctypes.data, q.nbytes)
        ctypes.memmove(base.ggml_get_data(xt), xs.ctypes.data, xs.nbytes)
        g = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(g, base.ggml_mul_mat(ctx, w, xt))
        graphs.append(g)
    calls = [(lambda g=g: cpu.ggml_graph_compute_with_ctx(ctx, g, threads)) for g in graphs]
    return calls, q.nbytes, ctx


# ------------------------------------------------------------------------------------ baseline kernel
def kernel_source_at(rev: str) -> str:
    """The nested kernel's C source at git revision ``rev`` (its ``engine/*_src`` imports read at ``rev`` too)."""
    def module(name: str) -> dict:
        text = subprocess.run(["git", "show", f"{rev}:engine/{name}.py"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        ns: dict = {}
        for dep, names in re.findall(r"^from moestream\.engine\.(\w+_src) import (.+)$", text, re.M):
            d = module(dep)
            ns.update({nm.strip(): d[nm.strip()] for nm in names.split(",")})
        exec(compile(re.sub(r"^from moestream\.engine\.\w+_src import .+$", "", text, flags=re.M),
                     f"{rev}:engine/{name}.py", "exec"), ns)
        return ns

    return module("native_kernels_src")["C_SOURCE"]


def load_baseline(rev: str) -> tuple[str, Any]:
    """(short revision, kernel library built from revision ``rev``) for the ``native int8-act @REV`` arm."""
    from moestream.convert.native_build import build_first_working, find_compiler

    short = subprocess.run(["git", "rev-parse", "--short=7", rev], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    cc = find_compiler()
    lib, errors = (None, ["no C compiler"]) if cc is None else build_first_working(
        f"nested_kernel_{short}", kernel_source_at(rev), nk._CFLAGS, nk._VARIANTS[:1], cc, nk._load, lambda _: None)
    if lib is None:
        raise SystemExit(f"could not build the kernel of {rev}: {'; '.join(errors)}")
    return short, lib


# ------------------------------------------------------------------------------------ cases
def build_cases(n: int, k: int, m: int, cold_bytes: int, threads: int, ggml: Any,
                baseline: tuple[str, Any] | None = None, rounds: int = 5, one_call: bool = False) -> list[dict]:
    """Every kernel for one shape and token count; each case is a list of zero-argument calls."""
    rng = np.random.default_rng(n + k + m)
    codec = get_codec("matryoshka_floor")
    x = torch.randn(m, k)
    cases: list[dict] = []

    def add(kernel: str, bits: int, nbytes: int, calls: list[Callable[[], Any]], keep: Any = None) -> None:
        cases.append({"kernel": kernel, "bits": bits, "N": n, "K": k, "M": m, "bytes_read": nbytes,
                      "calls": calls, "keep": keep})

    copies = lambda nbytes, cap=1024: max(2, min(cap, -(-cold_bytes // nbytes)))  # noqa: E731
    wf = torch.randn(n, k) * 0.02
    fp32 = [wf.clone() for _ in range(copies(wf.numel() * 4))]
    add("fp32", 32, wf.numel() * 4, [(lambda w=w: F.linear(x, w)) for w in fp32], fp32)
    scratch = torch.empty(n, k)
    for level, bits in LEVEL_BITS.items():
        enc0 = nk.random_encoded(codec, n, k, GROUP, rng)
        ops = [nk.encoded_operand(nk.random_encoded(codec, n, k, GROUP, rng), level)
               for _ in range(copies(nk.encoded_operand(enc0, level).nbytes))]
        for act in ("fp32", "int8"):  # the activation mode is switched per call (both arms pay the same ctypes call)
            add(f"native {act}-act", bits, ops[0].nbytes,
                [(lambda op=op, a=act: (nk.set_activation_mode(a), nk.linear(op, x))) for op in ops], ops)
        if one_call:
            own, y = nk.library(), torch.empty(m, n)
            add("native int8-act 1-call", bits, ops[0].nbytes,
                [(lambda op=op, lib=own, y=y: (lib.nq_set_act(1),  # the fp32 arm switches the mode per call
                                               lib.nq_linear(op.desc_ptr, op.bases_ptr, x.data_ptr(), m, y.data_ptr(),
                                                             threads)))
                 for op in ops], (ops, y))
        if baseline is not None:  # the int8 arm's Python path (less linear()'s checks), the other library's kernel
            rev, other = baseline
            add(f"native int8-act @{rev}", bits, ops[0].nbytes,
                [(lambda op=op, lib=other: (nk.set_activation_mode("int8"), lib.nq_set_act(1),
                                            nk._linear_raw(lib, op, x)))
                 for op in ops], ops)
        encs = [enc0.truncate(level) for _ in range(copies(enc0.nbytes(level), cap=16))]
        add("decode+matmul", bits, enc0.nbytes(level),
            [(lambda e=e, lv=level: F.linear(x, e.torch_decode(lv, out=scratch))) for e in encs], encs)
        deq = [K.KERNELS["dequant"].prepare(enc0, level) for _ in range(min(len(encs), copies(n * k, cap=16)))]
        add("dequant", bits, n * k + 8 * n * (k // GROUP),
            [(lambda d=d: K.KERNELS["dequant"].linear(d, x)) for d in deq], deq)
    for kind, bits in (("q4_0", 4), ("q8_0", 8)):  # moestream's own kernels on llama.cpp's block formats
        packed = [dk.quantize(wf, kind) for _ in range(copies(dk.quantize(wf, kind).nbytes, cap=64))]
        add(f"dense {kind}", bits, packed[0].nbytes, [(lambda p=p: dk.linear(x, p)) for p in packed], packed)
    if ggml is not None:
        for qtype, bits in (("Q4_0", 4), ("Q8_0", 8)):
            nbytes = n * k * (18 if qtype == "Q4_0" else 34) // 32
            cp = copies(nbytes)  # warm-up, then per round one cold pass and max(8, copies) hot calls
            calls, nbytes, ctx = ggml_case(ggml, qtype, n, k, x, cp, threads, 4 + rounds * (cp + max(8, cp)))
            add(f"ggml {qtype}", bits, nbytes, calls, ctx)
    return cases


def time_pass(calls: list[Callable[[], Any]], hot: bool, min_calls: int = 8) -> float:
    """Seconds per call: one pass over the copies (cold) or ``max(min_calls, copies)`` calls on the first (hot)."""
    seq = [calls[0]] * max(min_calls, len(calls)) if hot else calls
    t0 = time.perf_counter()
    for c in seq:
        c()
    return (time.perf_counter() - t0) / len(seq)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON document it writes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--cold-mb", type=int, default=96, help="bytes cycled per cold case (>= 3x the LLC)")
    ap.add_argument("--no-ggml", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "native_gemv.json")
    ap.add_argument("--baseline", metavar="REV", help="also time the int8 arm with the kernel of git revision REV")
    ap.add_argument("--one-call", action="store_true", help="also time the int8 kernel through one bare ctypes call")
    args = ap.parse_args(argv)
    if not nk.available():
        raise SystemExit("native kernels are not available (no C compiler, or MOESTREAM_NATIVE_KERNELS=0)")
    ggml = None if args.no_ggml else load_ggml()
    baseline = load_baseline(args.baseline) if args.baseline else None
    load_before = os.getloadavg()
    bw = read_bandwidth()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        cases = [c for n, k in SHAPES for m in args.tokens
                 for c in build_cases(n, k, m, args.cold_mb << 20, threads, ggml, baseline, args.rounds, args.one_call)]
        order = [(c, hot) for c in cases for hot in (False, True)]
        samples: dict[tuple[int, bool], list[float]] = {(id(c), hot): [] for c, hot in order}
        for c, hot in order:  # warm-up
            time_pass(c["calls"][:2], hot, 2)
        rng = random.Random(threads)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for c, hot in order:
                samples[(id(c), hot)].append(time_pass(c["calls"], hot))
        for c in cases:
            for hot in (False, True):
                s = samples[(id(c), hot)]
                med = statistics.median(s)
                rows.append({k: v for k, v in c.items() if k not in ("calls", "keep")} | {
                    "threads": threads, "cache": "hot" if hot else "cold", "copies": len(c["calls"]),
                    "median_us": 1e6 * med, "min_us": 1e6 * min(s), "max_us": 1e6 * max(s),
                    "GBps_of_bytes_read": c["bytes_read"] / med / 1e9,
                    "roofline_us": 1e6 * c["bytes_read"] / bw})
        del cases
    doc = {"benchmark": "native_gemv", "codec": "matryoshka_floor", "group_size": GROUP,
           "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "cpu_model": cpu_model(),
           "cpu_count": os.cpu_count(), "git_commit": git_commit(), "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(), "read_bandwidth_GBps": bw / 1e9, "ggml": ggml is not None,
           "baseline": baseline[0] if baseline else None,
           "note": "2 cores shared with other jobs (see loadavg): compare rows of the same run only.",
           "results": rows, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(json.dumps({"benchmark": "native_gemv", "out": str(args.out), "read_bandwidth_GBps": round(bw / 1e9, 2),
                      "native_vs_fp32_cold_M1": {f"{r['N']}x{r['K']} {r['kernel']} {r['bits']}b t{r['threads']}":
                                                 round(_ratio(rows, r, "fp32"), 2) for r in rows
                                                 if r["kernel"].startswith("native") and r["M"] == 1 and r["cache"] == "cold"}}))
    return doc


def _ratio(rows: list[dict], r: dict, other: str) -> float:
    """median time of ``other`` / median time of ``r`` in the same setting (>1: r is faster)."""
    o = next(x for x in rows if x["kernel"] == other and all(x[k] == r[k] for k in ("N", "K", "M", "threads", "cache")))
    return o["median_us"] / r["median_us"]


def _int8_summary(doc: dict) -> list[str]:
    """Markdown lines: the int8 arm (and its ``--baseline`` kernel) against ggml per projection, bits and setting."""
    rows = doc["results"]
    base = f"native int8-act @{doc['baseline']}" if doc.get("baseline") else None
    one = "native int8-act 1-call" if any(r["kernel"] == "native int8-act 1-call" for r in rows) else None

    def med(r: dict, kernel: str, bits: int) -> float | None:
        return next((x["median_us"] for x in rows if x["kernel"] == kernel and x["bits"] == bits and
                     all(x[k] == r[k] for k in ("N", "K", "M", "threads", "cache"))), None)

    head = "| threads | cache | N×K | M | bits | int8 µs |" + (f" @{doc['baseline']} µs |" if base else "") + \
        (" 1-call µs |" if one else "") + " ggml µs | int8 / ggml |" + (" 1-call / ggml |" if one else "")
    out = ["## int8 arm vs ggml (Q4_0 for 2/4 bits, Q8_0 for 8), median µs", "", head,
           "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        if r["kernel"] != "native int8-act":
            continue
        g = med(r, "ggml Q8_0" if r["bits"] == 8 else "ggml Q4_0", 8 if r["bits"] == 8 else 4)
        b = med(r, base, r["bits"]) if base else None
        o = med(r, one, r["bits"]) if one else None
        out.append(f"| {r['threads']} | {r['cache']} | {r['N']}×{r['K']} | {r['M']} | {r['bits']} | "
                   f"{r['median_us']:.0f} |" + (f" {b:.0f} |" if base else "") + (f" {o:.0f} |" if one else "") +
                   (f" {g:.0f} | {r['median_us'] / g:.2f} |" if g else " – | – |") +
                   ((f" {o / g:.2f} |" if g else " – |") if one else ""))
    return out + [""]


def markdown(doc: dict) -> str:
    """The results as Markdown: one table per (threads, cache)."""
    rows = doc["results"]
    out = [f"# Native nested kernel vs fp32 / decode+matmul / ggml — {doc['cpu_model']}, "
           f"{doc['cpu_count']} cores", "",
           f"torch {doc['torch']}, commit {doc['git_commit'][:10]}, matryoshka_floor group {doc['group_size']}, "
           f"{doc['rounds']} interleaved rounds, read bandwidth {doc['read_bandwidth_GBps']:.1f} GB/s, load average "
           f"before/after {doc['loadavg_before'][0]:.2f}/{doc['loadavg_after'][0]:.2f} (CPU shared with other jobs). "
           "µs per projection call, median (min–max); `× fp32` = fp32 median / this median (> 1: faster).", ""]
    out += _int8_summary(doc)
    for threads in doc["threads"]:
        for cache in ("cold", "hot"):
            out += [f"## {threads} thread(s), {cache} weights", "",
                    "| N×K | M | kernel | bits | MB read | median µs | min–max | GB/s | × fp32 |",
                    "|---|---:|---|---:|---:|---:|---|---:|---:|"]
            for r in rows:
                if r["threads"] != threads or r["cache"] != cache:
                    continue
                out.append(f"| {r['N']}×{r['K']} | {r['M']} | {r['kernel']} | {r['bits']} | "
                           f"{r['bytes_read'] / 1e6:.2f} | {r['median_us']:.0f} | {r['min_us']:.0f}–{r['max_us']:.0f} | "
                           f"{r['GBps_of_bytes_read']:.1f} | {_ratio(rows, r, 'fp32'):.2f} |")
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
