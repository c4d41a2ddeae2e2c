"""Benchmark: ``moestream convert`` of a model larger than its memory limit, inside a cgroup (issue 4 acceptance).

Owns one measurement: the synthetic Qwen3-30B-A3B-shaped checkpoint
(``bench/synthetic.py``, 6 layers, 7.5 GB of bf16 safetensors by default) is
converted by the real CLI (``python -m moestream.engine.cli convert``) as a
child process in a fresh cgroup v1 memory group with a hard limit (2 GB by
default; no swap, so anonymous memory above the limit is an OOM kill), once
per expert codec asked for (default: ``none`` = f16 and ``gguf_q8_0``), the
page cache dropped before each run; ``--limit`` takes several limits (the
committed run adds 600 MB to show the peak does not follow the model). A baseline child (the same interpreter
importing torch and the converter, converting nothing) shows how much of the
peak is Python itself.

Per run it records: exit status, wall time, ``memory.max_usage_in_bytes``
(page cache and mapped files included: what the kernel enforces),
``failcnt``, OOM kills, the child's max RSS, the sampled peaks of
``memory.stat`` (anonymous ``rss``, ``cache``, ``mapped_file``, ``dirty``,
``writeback``), input and output bytes and the conversion throughput.
Writes ``bench/results/convert_large.json`` (machine, git commit, versions,
load average) and ``convert_large.md``, and prints one JSON summary line.

Nested codecs (``matryoshka*``, ``residual``) and pruning (``--convert-args
'--prune 0.25'``) calibrate first; calibration streams the model one decoder
layer (and one expert) at a time (engine/streamed_calibration.py), so they run
under the same limits (results: ``convert_large.md``, nested section).

Knows nothing about the converter's internals: it drives the CLI.
Run: ``python -m moestream.bench.convert_under_cgroup --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from moestream.bench.cgroup import cgroup_unavailable_reason, run_limited

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DEFAULT_HF = Path("/work/bench_data/qwen3_30b_a3b_shape_6l/hf")
DEFAULT_WORK = Path("/work/bench_data/convert_under_cgroup")
BASELINE_CODE = "import torch, moestream.engine.cli, moestream.convert.convert, moestream.convert.compress"


def _parse_size(text: str) -> int:
    from moestream.convert.commands import parse_size

    return parse_size(text)


def folder_bytes(path: Path, pattern: str) -> int:
    """Total size of the files matching ``pattern`` in ``path``."""
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def convert_argv(hf: Path, out: Path, codec: str, max_shard_size: str, extra: list[str] | None = None) -> list[str]:
    """The CLI command of one run (``none``: the v1 converter, f16 experts; ``extra``: more convert options)."""
    argv = [sys.executable, "-m", "moestream.engine.cli", "convert", str(hf), str(out), "--quiet",
            "--max-shard-size", max_shard_size]
    return (argv if codec == "none" else argv + ["--codec", codec]) + list(extra or [])


def _record(run: Any) -> dict[str, Any]:
    d = run.as_dict()
    for k in ("stdout", "stderr"):
        d[k] = d[k][-600:]
    return d


def measure(hf: Path, work: Path, codecs: list[str], limits: list[int], max_shard_size: str, timeout_s: float,
            keep: bool, log=print, extra: list[str] | None = None) -> dict[str, Any]:
    """Run the baseline, then every codec under every limit; returns the results document (without machine info)."""
    input_bytes = folder_bytes(hf, "*.safetensors")
    config = json.loads((hf / "config.json").read_text())
    spec_file = hf / "synthetic_spec.json"
    doc: dict[str, Any] = {
        "benchmark": "convert_under_cgroup",
        "model": {"hf_dir": str(hf), "model_type": config.get("model_type"), "input_bytes": input_bytes,
                  "spec": json.loads(spec_file.read_text()) if spec_file.is_file() else None},
        "config": {"limits_bytes": limits, "codecs": codecs, "max_shard_size": max_shard_size,
                   "convert_args": list(extra or []), "page_cache_dropped_before_each_run": True},
        "cgroup_unavailable": cgroup_unavailable_reason(),
    }
    log(f"baseline: {BASELINE_CODE}")
    doc["baseline"] = _record(run_limited([sys.executable, "-c", BASELINE_CODE], max(limits), timeout_s=600,
                                          sample_stats=True))
    runs = []
    for limit, codec in [(lim, c) for lim in limits for c in codecs]:
        out = work / f"out_{codec}"
        shutil.rmtree(out, ignore_errors=True)
        argv = convert_argv(hf, out, codec, max_shard_size, extra)
        log(f"{codec}: {' '.join(argv[1:])}")
        run = run_limited(argv, limit, timeout_s=timeout_s, sample_stats=True)
        rec = _record(run)
        out_bytes = folder_bytes(out, "*.gguf") if out.is_dir() else 0
        rec.update(codec=codec, limit_requested=limit, input_bytes=input_bytes, output_bytes=out_bytes,
                   shards=len(list(out.glob("*.gguf"))) if out.is_dir() else 0,
                   input_mb_per_s=input_bytes / 1e6 / run.wall_s if run.status == "ok" else None,
                   peak_over_input=(run.cgroup_max_usage_bytes or 0) / input_bytes)
        runs.append(rec)
        log(f"  {run.status} in {run.wall_s:.1f} s, peak {(run.cgroup_max_usage_bytes or 0) / 2**20:.0f} MiB "
            f"(limit {limit / 2**20:.0f} MiB), failcnt {run.cgroup_failcnt}, output {out_bytes / 2**30:.2f} GiB")
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    doc["runs"] = runs
    return doc


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown section for ``bench/results/convert_large.md``."""
    m, mach, cfg = doc["model"], doc.get("machine", {}), doc["config"]
    base = doc["baseline"]
    bpeak = base.get("cgroup_stat_peaks") or {}
    lines = [
        "# Converting a model larger than the memory limit (cgroup v1)",
        "",
        f"Model: `{m['hf_dir']}` ({m['model_type']}, synthetic Qwen3-30B-A3B shapes, random bf16 weights: "
        f"{m['input_bytes'] / 1e9:.2f} GB of safetensors). Each run: `python -m moestream.engine.cli convert HF OUT "
        f"--quiet --max-shard-size {cfg['max_shard_size']} [--codec C]"
        + "".join(f" {a}" for a in cfg.get("convert_args", [])) + "` as a child in a fresh memory cgroup with "
        f"`memory.limit_in_bytes` = " + " / ".join(f"{x / 1e9:g} GB" for x in cfg["limits_bytes"])
        + " (no swap), page cache dropped first. "
        f"Generated by `python -m moestream.bench.convert_under_cgroup` on {mach.get('cpu_model')} "
        f"({mach.get('cores_logical')} shared cores, load average "
        f"{', '.join(f'{x:.2f}' for x in mach.get('loadavg', []))}), commit "
        f"{str(mach.get('git_commit'))[:10]}{' (dirty)' if mach.get('git_dirty') else ''}, "
        f"torch {mach.get('torch')}, {mach.get('date_utc')}.",
        "",
        "Peak = `memory.max_usage_in_bytes` (what the kernel enforces: anonymous memory + page cache + mapped "
        "files). rss / cache / dirty = sampled peaks of `memory.stat` (every ~20 ms).",
        "",
        "| limit MiB | codec | status | wall s | input MB/s | peak MiB | peak / input | failcnt | OOM kills | rss MiB "
        "| cache MiB | mapped MiB | dirty MiB | output GiB | shards |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {_mib(base['limit_bytes'])} | baseline (imports only) | {base['status']} | {base['wall_s']:.1f} | "
        f"| {_mib(base['cgroup_max_usage_bytes'])} "
        f"| | {base['cgroup_failcnt']} | {base['cgroup_oom_kills']} | {_mib(bpeak.get('rss'))} "
        f"| {_mib(bpeak.get('cache'))} | {_mib(bpeak.get('mapped_file'))} | {_mib(bpeak.get('dirty'))} | | |",
    ]
    for r in doc["runs"]:
        p = r.get("cgroup_stat_peaks") or {}
        mbs = f"{r['input_mb_per_s']:.0f}" if r.get("input_mb_per_s") else "–"
        lines.append(
            f"| {_mib(r['limit_bytes'])} | {r['codec']} | {r['status']} | {r['wall_s']:.1f} | {mbs} "
            f"| {_mib(r['cgroup_max_usage_bytes'])} "
            f"| {r['peak_over_input']:.3f} | {r['cgroup_failcnt']} | {r['cgroup_oom_kills']} | {_mib(p.get('rss'))} "
            f"| {_mib(p.get('cache'))} | {_mib(p.get('mapped_file'))} | {_mib(p.get('dirty'))} "
            f"| {r['output_bytes'] / 2**30:.2f} | {r['shards']} |")
    lines += ["", "Above baseline = peak − the baseline child's peak (the interpreter, torch and the converter "
              "imported, nothing converted).", ""]
    for r in doc["runs"]:
        if r.get("cgroup_max_usage_bytes") and base.get("cgroup_max_usage_bytes"):
            lines.append(f"- {r['codec']} under {_mib(r['limit_bytes'])} MiB: "
                         f"{_mib(r['cgroup_max_usage_bytes'] - base['cgroup_max_usage_bytes'])} MiB above baseline "
                         f"for a {r['input_bytes'] / 2**30:.2f} GiB input.")
    lines += [*[f"- {n}" for n in doc.get("notes", [])], "", f"Command: `{doc.get('command', '')}`"]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 when every conversion finished inside the limit."""
    ap = argparse.ArgumentParser(
        prog="python -m moestream.bench.convert_under_cgroup",
        description="Convert a large synthetic HF MoE checkpoint with `moestream convert` inside a cgroup v1 "
                    "memory limit (default 2 GB) and report peak cgroup memory (max_usage_in_bytes), failcnt, "
                    "sampled memory.stat peaks, wall time and input/output sizes as JSON + Markdown. "
                    "Needs root and the cgroup v1 memory controller (otherwise runs unlimited and says so).")
    ap.add_argument("--hf", type=Path, default=DEFAULT_HF,
                    help=f"HF checkpoint folder (default {DEFAULT_HF}; make one with `python bench/synthetic.py`)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK,
                    help=f"where outputs are written (default {DEFAULT_WORK}; keep it off the repo)")
    ap.add_argument("--limit", type=_parse_size, nargs="+", default=["2GB"], metavar="SIZE",
                    help="cgroup memory limit(s), e.g. 2GB (10^9 bytes), 1.5GiB, 600MB; each codec runs under each "
                         "(default 2GB)")
    ap.add_argument("--codec", nargs="+", default=["none", "gguf_q8_0"],
                    help="expert codecs to run (default: none gguf_q8_0); nested codecs and --prune calibrate "
                         "first, streaming the model layer by layer")
    ap.add_argument("--convert-args", default="", metavar="ARGS",
                    help="more options for every convert run, one shell-quoted string (e.g. '--prune 0.25')")
    ap.add_argument("--max-shard-size", default="2GB", help="passed to convert (default 2GB)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per conversion before it is killed")
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs in --work")
    ap.add_argument("--out", type=Path, default=RESULTS / "convert_large.json", help="results JSON")
    ap.add_argument("--md", type=Path, default=RESULTS / "convert_large.md", help="results Markdown")
    ap.add_argument("--note", action="append", default=[], help="a note for the Markdown (repeatable)")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="only rewrite --md from an existing results JSON (e.g. after editing its notes)")
    args = ap.parse_args(argv)
    args.limit = [_parse_size(x) if isinstance(x, str) else x for x in args.limit]
    if args.render is not None:
        args.md.write_text(markdown(json.loads(args.render.read_text())))
        return 0
    if not (args.hf / "config.json").is_file():
        ap.error(f"{args.hf}: no config.json; generate the model first (python bench/synthetic.py --help)")
    from moestream.bench.harness import machine_info

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = machine_info()
    extra = shlex.split(args.convert_args)
    doc = measure(args.hf, args.work, args.codec, args.limit, args.max_shard_size, args.timeout, args.keep,
                  log=lambda s: print(s, file=sys.stderr, flush=True), extra=extra)
    doc["machine"] = machine
    doc["machine"]["loadavg_after"] = list(os.getloadavg())
    doc["total_s"] = time.perf_counter() - t0
    doc["notes"] = args.note
    doc["command"] = (f"python -m moestream.bench.convert_under_cgroup --hf {args.hf} --limit "
                      + " ".join(str(x) for x in args.limit) + " --codec " + " ".join(args.codec)
                      + f" --max-shard-size {args.max_shard_size}"
                      + (f" --convert-args {shlex.quote(args.convert_args)}" if extra else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.md.write_text(markdown(doc))
    ok = all(r["status"] == "ok" for r in doc["runs"])
    print(json.dumps({"benchmark": "convert_under_cgroup", "ok": ok, "input_bytes": doc["model"]["input_bytes"],
                      "runs": [{"limit_bytes": r["limit_requested"], "codec": r["codec"], "status": r["status"],
                                "peak_bytes": r["cgroup_max_usage_bytes"], "wall_s": round(r["wall_s"], 1)}
                               for r in doc["runs"]],
                      "out": str(args.out)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
