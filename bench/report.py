"""Render benchmark results: Markdown tables and PNG plots from a results JSON.

Owns :func:`summary_rows` (median with min–max per budget x arm x pass),
:func:`comparison_rows` (moestream / llama.cpp ratios of medians in the same
budget and pass), :func:`markdown` (the tables plus machine, physical limits and
notes), :func:`plot_tok_s_vs_budget` and :func:`plot_hit_rate` (measured hit
rate against cache size, with the LRU/LFU/consistency/Belady curves of a
``moestream analyze`` report when one is given).

Knows nothing about how the numbers were measured (``bench/harness.py``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from moestream.bench.harness import median_range


def _groups(records: Sequence[dict]) -> dict[tuple, list[dict]]:
    g: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        g[(r["budget_label"], r.get("pass") or "-", r["arm"])].append(r)
    return g


def _budget_order(records: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r["budget_label"] not in seen:
            seen.append(r["budget_label"])
    return seen


def summary_rows(records: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per (budget, pass, arm): medians and ranges of the metrics, status counts.

    Failed runs (OOM, refusal, error, timeout) have no ``pass``; they are counted
    in every pass row of their arm and budget, and get a row of their own when
    the arm has no successful run there.
    """
    g = _groups(records)
    rows = []
    for budget in _budget_order(records):
        arms = list(dict.fromkeys(r["arm"] for r in records if r["budget_label"] == budget))
        passes = sorted({k[1] for k in g if k[0] == budget and k[1] != "-"}) or ["-"]
        for p in passes:
            for arm in arms:
                ok = g.get((budget, p, arm), [])
                failed = g.get((budget, "-", arm), [])
                if not ok and not failed:
                    continue
                if not ok and p != passes[0]:
                    continue
                recs = ok + failed
                status: dict[str, int] = defaultdict(int)
                for r in recs:
                    status[r["status"]] += 1
                first = recs[0]
                row = {"budget": budget, "pass": p if ok else "-", "arm": arm, "engine": first["engine"],
                       "format": first["format"], "limit_bytes": first["limit_bytes"],
                       "status": dict(status), "n": len(recs)}
                for key in ("decode_tok_s", "decode_tok_s_steady", "prefill_tok_s", "ttft_s", "cgroup_peak_bytes",
                            "peak_rss_bytes", "decode_hit_rate", "bytes_read_per_token", "disk_read_bytes_per_token",
                            "miss_path_bandwidth_bytes_per_s", "decode_stall_s_per_token", "load_s"):
                    row[key] = median_range([r.get(key) for r in ok])
                row["errors"] = sorted({(r.get("error") or "")[:160] for r in failed if r.get("error")})
                rows.append(row)
    return rows


def comparison_rows(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """moestream arm / llama.cpp arm ratios of median decode and prefill tok/s, same budget and pass."""
    out = []
    for r in rows:
        if r["engine"] != "moestream" or r["decode_tok_s"][0] is None:
            continue
        for other in rows:
            if other["engine"] != "llamacpp" or other["budget"] != r["budget"] or other["pass"] != r["pass"]:
                continue
            od, op = other["decode_tok_s"][0], other["prefill_tok_s"][0]
            out.append({"budget": r["budget"], "pass": r["pass"], "moestream": r["arm"], "llamacpp": other["arm"],
                        "moestream_decode": r["decode_tok_s"][0], "llamacpp_decode": od,
                        "decode_ratio": r["decode_tok_s"][0] / od if od else None,
                        "prefill_ratio": r["prefill_tok_s"][0] / op if op and r["prefill_tok_s"][0] else None,
                        "llamacpp_status": other["status"]})
    return out


def _m(t: tuple, scale: float = 1.0, digits: int = 3) -> str:
    med, lo, hi = t
    if med is None:
        return "–"
    f = (lambda x: f"{x * scale:.{digits}g}")
    return f"{f(med)} [{f(lo)}–{f(hi)}]" if lo != hi else f(med)


def _status(s: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(s.items()))


def markdown(doc: dict, title: str | None = None) -> str:
    """The results as Markdown: setup, physical limits, per-arm table, ratios, failures."""
    recs = doc["records"]
    rows = summary_rows(recs)
    cfg, mach, phys = doc.get("config", {}), doc.get("machine", {}), doc.get("physical", {})
    lines = [f"## {title or doc.get('suite')}", ""]
    lines.append(f"- machine: {mach.get('cpu_model')} ({', '.join(mach.get('cpu_flags', []))}), "
                 f"{mach.get('cores_logical')} logical cores, RAM {mach.get('ram_bytes', 0) / 2**30:.1f} GiB; "
                 f"torch {mach.get('torch')}, llama-cpp-python {mach.get('llama_cpp_python')}; "
                 f"commit {str(mach.get('git_commit'))[:10]}{' (dirty)' if mach.get('git_dirty') else ''}; "
                 f"{mach.get('date_utc')}; load average at start {mach.get('loadavg')}, end {mach.get('loadavg_end')}")
    lines.append(f"- decode: {cfg.get('mode')} ({cfg.get('decode_steps')} steps), prompt "
                 f"{recs[0].get('prompt_tokens') if recs else '?'} tokens of real text, {cfg.get('threads')} threads "
                 f"both engines, ctx {cfg.get('ctx')}; {cfg.get('reps')} interleaved repetitions per budget, each a "
                 "fresh process in a fresh cgroup after dropping the page cache; pass 'cold' = first pass, "
                 "'warm' = same tokens again in the same process (KV reset, caches kept)")
    lines.append(f"- budgets: limit = overhead {cfg.get('overhead_bytes', 0) / 1e9:.3f} GB + fraction x "
                 f"{cfg.get('reference_bytes', 0) / 1e9:.3f} GB (reference file bytes); same kernel limit "
                 "(cgroup v1 memory.limit_in_bytes) for every arm of a row")
    for note in cfg.get("notes", []):
        lines.append(f"- {note}")
    disk = phys.get("disk") or {}
    if disk.get("bandwidth_bytes_per_s"):
        lines.append(f"- physical: sequential read of the model's disk {disk['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s "
                     f"({disk.get('method')}, {disk.get('bytes', 0) / 1e9:.1f} GB); "
                     + (f"expert bytes per token {phys['expert_bytes_per_token'] / 1e6:.0f} MB -> I/O roofline with "
                        f"no hits {disk['bandwidth_bytes_per_s'] / phys['expert_bytes_per_token']:.2f} tok/s"
                        if phys.get("expert_bytes_per_token") else ""))
    if phys.get("memory_bandwidth_bytes_per_s"):
        a = phys.get("active_params_per_token") or {}
        bounds = ", ".join(f"{k} {v:.3g}" for k, v in (phys.get("memory_bound_decode_tok_s") or {}).items() if v)
        lines.append(f"- physical: memory copy bandwidth {phys['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; active "
                     f"parameters per token {a.get('dense', 0) / 1e6:.0f} M dense + {a.get('experts', 0) / 1e6:.0f} M "
                     f"routed; memory-bound decode tok/s (all active weights read once): {bounds}")
    lines += ["", "| budget | limit GB | arm | pass | runs | decode tok/s | steady decode | prefill tok/s | TTFT s | "
              "cgroup peak GB | peak RSS GB | decode hit rate | MB read/token | miss-path GB/s | stall ms/token |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lim = "none" if r["limit_bytes"] is None or r["limit_bytes"] > 2**60 else f"{r['limit_bytes'] / 1e9:.2f}"
        mb = r["bytes_read_per_token"] if r["bytes_read_per_token"][0] is not None else r["disk_read_bytes_per_token"]
        lines.append(f"| {r['budget']} | {lim} | {r['arm']} | {r['pass']} | {_status(r['status'])} | "
                     f"{_m(r['decode_tok_s'])} | {_m(r['decode_tok_s_steady'])} | {_m(r['prefill_tok_s'])} | "
                     f"{_m(r['ttft_s'])} | {_m(r['cgroup_peak_bytes'], 1e-9)} | {_m(r['peak_rss_bytes'], 1e-9)} | "
                     f"{_m(r['decode_hit_rate'])} | {_m(mb, 1e-6)} | {_m(r['miss_path_bandwidth_bytes_per_s'], 1e-9)} | "
                     f"{_m(r['decode_stall_s_per_token'], 1e3)} |")
    comp = comparison_rows(rows)
    if comp:
        lines += ["", "moestream / llama.cpp (ratio of medians, same budget and pass; > 1 = moestream faster):", "",
                  "| budget | pass | moestream arm | llama.cpp arm | decode tok/s (ms / llama) | decode ratio | "
                  "prefill ratio |", "|---|---|---|---|---|---|---|"]
        for c in comp:
            dr = "–" if c["decode_ratio"] is None else f"{c['decode_ratio']:.2f}x"
            pr = "–" if c["prefill_ratio"] is None else f"{c['prefill_ratio']:.2f}x"
            lines.append(f"| {c['budget']} | {c['pass']} | {c['moestream']} | {c['llamacpp']} | "
                         f"{c['moestream_decode']:.3g} / {c['llamacpp_decode'] or 0:.3g} | {dr} | {pr} |")
    errs = [(r["budget"], r["arm"], e) for r in rows for e in r["errors"]]
    if errs:
        lines += ["", "Failures (recorded as results):", ""]
        lines += [f"- {b} {a}: `{e.strip().splitlines()[-1] if e.strip() else e}`" for b, a, e in errs]
    lines += ["", "Columns: median [min–max] over repetitions; 'MB read/token' is the engine's own count of expert "
              "bytes read while decoding (moestream) or /proc/self/io read_bytes while decoding (llama.cpp, mmap "
              "page faults); 'miss-path GB/s' = those bytes / decode time.", ""]
    return "\n".join(lines)


def plot_tok_s_vs_budget(docs: Sequence[dict], out_png: str | Path, title: str = "decode tok/s vs memory budget") -> None:
    """Median decode tok/s (min–max bars) vs budget fraction, one line per arm; cold solid, warm dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for doc in docs:
        rows = summary_rows(doc["records"])
        fracs = {r["budget_label"]: r["budget_fraction"] for r in doc["records"]}
        for arm in dict.fromkeys(r["arm"] for r in rows):
            for p, style in (("cold", "-o"), ("warm", "--s")):
                pts = [(fracs[r["budget"]], r["decode_tok_s"]) for r in rows
                       if r["arm"] == arm and r["pass"] == p and fracs.get(r["budget"]) is not None
                       and r["decode_tok_s"][0] is not None]
                if not pts:
                    continue
                pts.sort(key=lambda t: t[0])
                xs = [100 * x for x, _ in pts]
                ys = [m[0] for _, m in pts]
                err = [[m[0] - m[1] for _, m in pts], [m[2] - m[0] for _, m in pts]]
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=f"{arm} ({p})")
    ax.set_xlabel("memory budget (% of model file bytes, plus runtime overhead)")
    ax.set_ylabel("decode tokens/s (median, min–max)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_hit_rate(doc: dict, out_png: str | Path, analysis_report: str | Path | None = None,
                  title: str = "expert cache hit rate vs cache size") -> bool:
    """Measured decode hit rate vs arena size (share of all experts), with an analysis report's curves.

    Returns:
        False when there is nothing to plot (no moestream hit rates and no report).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drew = False
    if analysis_report and Path(analysis_report).is_file():
        rep = json.loads(Path(analysis_report).read_text())
        tr, rhos = rep["trace"], rep["settings"]["rhos"]
        xs = [100 * rho * tr["top_k"] / tr["n_experts"] for rho in rhos]
        for pol, curve in rep["hit_rate"]["model"].items():
            ax.plot(xs, curve["observed"], "--" if pol != "belady" else "-k", label=f"{pol} (trace simulation)")
            drew = True
    pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in doc["records"]:
        if r.get("decode_hit_rate") is not None and r.get("arena_slots") and r.get("experts_total"):
            pts[f"{r['arm']} ({r['pass']})"].append((100 * min(1.0, r["arena_slots"] / r["experts_total"]),
                                                     r["decode_hit_rate"]))
    for label, xy in pts.items():
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], "o", label=f"measured {label}")
        drew = True
    if not drew:
        plt.close(fig)
        return False
    ax.set_xlabel("expert cache size (% of all routed experts)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def render(results_json: str | Path, out_dir: str | Path | None = None, analysis: str | Path | None = None) -> str:
    """Write ``<suite>.md`` and the PNG plots beside (or into ``out_dir``) a results file; return the Markdown."""
    path = Path(results_json)
    doc = json.loads(path.read_text())
    out = Path(out_dir) if out_dir else path.parent
    stem = path.stem
    md = markdown(doc)
    (out / f"{stem}.md").write_text(md)
    if any(r.get("budget_fraction") is not None for r in doc["records"]):
        plot_tok_s_vs_budget([doc], out / f"{stem}_tok_s_vs_budget.png", title=f"{stem}: decode tok/s vs memory budget")
    plot_hit_rate(doc, out / f"{stem}_hit_rate.png", analysis, title=f"{stem}: expert cache hit rate vs cache size")
    return md


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="render a bench results JSON as Markdown + PNG plots")
    ap.add_argument("results")
    ap.add_argument("--out")
    ap.add_argument("--analysis")
    a = ap.parse_args()
    print(render(a.results, a.out, a.analysis))
