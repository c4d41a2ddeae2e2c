"""Compression quality sweep on the embedded default model: pruning x criteria, codecs x levels, uniform baselines.

Every arm goes through the real converter (:func:`moestream.convert.compress.compress_checkpoint`)
into shards, is loaded back with experts decoded at each nested level
(:func:`moestream.engine.compressed_models.load_eval_model`) and compared with
the unmodified HF model on held-out text (:class:`moestream.convert.quality.ReferenceRun`:
perplexity, mean KL(ref‖model), top-1 agreement). Arms:

- ``f16``: plain conversion (sanity: KL ≈ 0);
- ``prune``: 25 % / 50 % x {reap, frequency, ean, cc}, experts f16 (pruning alone);
- ``prune_adaptive``: 25 % / 50 % x {reap, frequency} with ``--prune-mode adaptive`` (per-layer
  counts from one global threshold; the same share of all experts is dropped);
- ``codec``: matryoshka_floor, matryoshka (spec slice), residual at every level, no pruning;
- ``uniform``: gguf Q8_0 / Q4_0 experts + dense (no favouring) and, at the same file size, the
  nested codecs with bit allocation (``--size-budget`` = that size) and the same dense type;
- ``compass``: 25 % pruning (reap and the best criterion at 25 %) + nested codecs at every level,
  and with ``--size-budget 4bpw``.

Calibration: the embedded calibration sample (one statistics pass, reused by every arm).
Held-out: ``--windows`` windows of ``--seq-len`` tokens from each domain file.

Writes bench/results/compression_quality.json and .md; prints one JSON summary line.
``--only adaptive`` runs just the ``prune_adaptive`` arms (plus ``prune25_reap`` again as a
reproducibility check against the stored row) and merges them into the existing JSON/Markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moestream.convert.calibration import collect_stats, read_calibration_text, split_windows, tokenize_windows
from moestream.convert.compress import CompressOptions, compress_checkpoint
from moestream.convert.quality import ReferenceRun
from moestream.engine.compressed_models import load_calibration_model, load_eval_model, stored_levels

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL = ROOT / "engine" / "default_model"
CRITERIA = ("reap", "frequency", "ean", "cc")
ADAPTIVE_CRITERIA = ("reap", "frequency")
NESTED = ("matryoshka_floor", "matryoshka", "residual")


def heldout_windows(folder: Path, tokenizer: Path, per_domain: int, seq_len: int) -> tuple[list[list[int]], list[str]]:
    """``per_domain`` windows spread over each held-out file."""
    windows, domains = [], []
    for f in sorted(folder.glob("*.txt")):
        w = tokenize_windows(f.read_text(encoding="utf-8"), tokenizer, seq_len, max_windows=per_domain)
        windows += [x for x in w if len(x) == seq_len][:per_domain]
        domains.append(f.stem)
    return windows, domains


class Sweep:
    def __init__(self, model_dir: Path, ref: ReferenceRun, calibration, work: Path) -> None:
        self.model_dir, self.ref, self.cal, self.work = model_dir, ref, calibration, work
        self.rows: list[dict] = []

    def _expert_weights(self, rec: dict) -> int:
        st = next(iter(self.cal.layers.values()))
        return sum(len(v) for v in rec["levels"].values()) * 3 * st.hidden * st.inter

    def arm(self, section: str, name: str, opts: CompressOptions, levels: str = "all") -> list[dict]:
        out = self.work / name
        t0 = time.perf_counter()
        paths, rec = compress_checkpoint(self.model_dir, out, opts, calibration=self.cal, progress=False,
                                         overwrite=True, max_shard_size=0)
        convert_s = time.perf_counter() - t0
        n = stored_levels(out)
        todo = list(range(n)) if levels == "all" else [n - 1]
        rows = []
        for lv in todo:
            model, _ = load_eval_model(out, lv if levels == "all" else None)
            m = self.ref.compare(model).as_dict()
            del model
            row = {"section": section, "arm": name,
                   "level": (lv if levels == "all" else "alloc") if n > 1 else None, "codec": opts.codec,
                   "prune": opts.prune, "criterion": opts.criterion if opts.prune else None,
                   "prune_mode": opts.prune_mode if opts.prune else None,
                   "experts_per_layer": [len(v) for _, v in sorted(rec["kept"].items(), key=lambda kv: int(kv[0]))]
                   or None,
                   "size_budget": opts.size_budget, "dense": opts.dense, "file_bytes": rec["file_bytes"],
                   "tensor_bytes": rec["dense_bytes"] + rec["expert_bytes"], "expert_bytes": rec["expert_bytes"],
                   "expert_weights": self._expert_weights(rec), "convert_s": round(convert_s, 2), **m}
            if "allocation" in rec:
                row["allocation"] = rec["allocation"]
            if lv < n - 1 and levels == "all":  # expert bytes when every expert is capped at this level
                row["expert_bytes_at_level"] = _bytes_at_level(out, lv)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("arm", "level", "ppl_increase", "kl_mean", "top1_agreement")}),
                  flush=True)
        shutil.rmtree(out, ignore_errors=True)
        self.rows += rows
        return rows


def _bytes_at_level(path: Path, level: int) -> int:
    from moestream.convert.shards import ShardedModel

    with ShardedModel.open(path, verify="off") as r:
        return sum(r.expert_nbytes(l, e, min(level, r.n_levels(l, e) - 1)) for l, e in r.expert_keys())


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    model_dir = Path(args.model)
    tok = model_dir / "tokenizer.json"
    windows, domains = heldout_windows(Path(args.heldout), tok, args.windows, args.seq_len)
    reference = load_calibration_model(model_dir)
    ref = ReferenceRun(reference, windows)
    calib_text = read_calibration_text([args.calib])
    cwin = tokenize_windows(calib_text, tok, args.seq_len, max_windows=args.calib_windows)
    t0 = time.perf_counter()
    cal = collect_stats(reference, cwin)
    calib_s = time.perf_counter() - t0
    del reference
    work = Path(tempfile.mkdtemp(prefix="quality_sweep_"))
    sw = Sweep(model_dir, ref, cal, work)
    if args.only == "adaptive":
        try:
            sw.arm("prune", "prune25_reap", CompressOptions(prune=0.25, criterion="reap"))  # reproducibility check
            adaptive_arms(sw)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        import hashlib

        return {"model": str(model_dir), "model_sha256": hashlib.sha256((model_dir / "model.safetensors").read_bytes())
                .hexdigest(), "ref_ppl": ref.ppl, "positions": ref.positions, "windows": len(ref.windows),
                "calibration_tokens": cal.tokens, "threads": args.threads,
                "total_s": round(time.perf_counter() - t_start, 1), "rows": sw.rows}
    try:
        sw.arm("baseline", "f16", CompressOptions(codec="none", dense="f16"))
        for ratio in (0.25, 0.5):
            for c in CRITERIA:
                sw.arm("prune", f"prune{int(ratio * 100)}_{c}", CompressOptions(prune=ratio, criterion=c))
        adaptive_arms(sw)
        for codec in NESTED:
            sw.arm("codec", codec, CompressOptions(codec=codec))
        for q in ("q8_0", "q4_0"):
            base = sw.arm("uniform", f"uniform_{q}", CompressOptions(codec=f"gguf_{q}", dense=q, favour=False))[0]
            for codec in ("matryoshka_floor", "residual"):
                sw.arm("uniform", f"{codec}_at_{q}_size",
                       CompressOptions(codec=codec, dense=q, favour=False, size_budget=str(base["tensor_bytes"])),
                       levels="max")
        p25 = [r for r in sw.rows if r["section"] == "prune" and r["prune"] == 0.25]
        best = min(p25, key=lambda r: r["kl_mean"])["criterion"]
        for crit in sorted({"reap", best}):
            for codec in ("matryoshka_floor", "residual"):
                sw.arm("compass", f"prune25_{crit}_{codec}", CompressOptions(codec=codec, prune=0.25, criterion=crit))
                sw.arm("compass", f"prune25_{crit}_{codec}_4bpw",
                       CompressOptions(codec=codec, prune=0.25, criterion=crit, size_budget="4bpw"), levels="max")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import hashlib

    sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    return {"model": str(model_dir), "model_sha256": sha, "domains": domains, "windows": len(ref.windows), "seq_len": args.seq_len,
            "positions": ref.positions, "ref_ppl": ref.ppl, "calibration": {"tokens": cal.tokens, "windows": cal.windows,
                                                                             "seconds": round(calib_s, 2)},
            "threads": args.threads, "total_s": round(time.perf_counter() - t_start, 1), "rows": sw.rows,
            "best_criterion_at_25": best}


def adaptive_arms(sw: Sweep) -> None:
    """``--prune-mode adaptive`` beside the uniform pruning rows (same ratios, experts f16)."""
    for ratio in (0.25, 0.5):
        for c in ADAPTIVE_CRITERIA:
            sw.arm("prune_adaptive", f"prune{int(ratio * 100)}_{c}_adaptive",
                   CompressOptions(prune=ratio, criterion=c, prune_mode="adaptive"))


def merge_partial(stored: dict, part: dict) -> dict:
    """Put ``part``'s adaptive rows into ``stored`` (after the uniform pruning rows), checking the setup matches.

    Raises:
        SystemExit: the reference perplexity, positions or the re-run ``prune25_reap`` row differ.
    """
    check = next(r for r in part["rows"] if r["arm"] == "prune25_reap")
    old = next(r for r in stored["rows"] if r["arm"] == "prune25_reap")
    same = (part["model_sha256"] == stored.get("model_sha256")
            and abs(part["ref_ppl"] - stored["ref_ppl"]) <= 1e-9 * stored["ref_ppl"]
            and part["positions"] == stored["positions"] and abs(check["kl_mean"] - old["kl_mean"]) <= 1e-9)
    if not same:
        raise SystemExit(f"the partial run does not reproduce the stored setup (model sha256, ref ppl {part['ref_ppl']} vs "
                         f"{stored['ref_ppl']}, prune25_reap KL {check['kl_mean']} vs {old['kl_mean']}); "
                         "re-run the whole sweep")
    new = [r for r in part["rows"] if r["section"] == "prune_adaptive"]
    names = {r["arm"] for r in new}
    rows = [r for r in stored["rows"] if r["arm"] not in names]
    at = max(i for i, r in enumerate(rows) if r["section"] == "prune") + 1
    out = dict(stored)
    out["rows"] = rows[:at] + new + rows[at:]
    out["partial_runs"] = [p for p in stored.get("partial_runs", []) if p.get("only") != "adaptive"] + [{
        "only": "adaptive", "arms": sorted(names), "model": part["model"], "total_s": part["total_s"],
        "threads": part["threads"],
        "check": {"arm": "prune25_reap", "kl_mean_stored": old["kl_mean"], "kl_mean_rerun": check["kl_mean"],
                  "ppl_stored": old["ppl"], "ppl_rerun": check["ppl"]}}]
    return out


def _bits(row: dict) -> str:
    b = row.get("expert_bytes_at_level", row["expert_bytes"])
    return f"{8 * b / row['expert_weights']:.2f}"


def markdown(res: dict) -> str:
    lines = [f"# Compression quality on the embedded default model",
             "",
             f"Reference: `{res['model']}` (model.safetensors sha256 `{res.get('model_sha256', '?')[:16]}…`; bf16 "
             f"HF weights run in fp32{'; ' + res['model_note'] if res.get('model_note') else ''}), held-out ppl **{res['ref_ppl']:.3f}** on "
             f"{res['positions']} predicted positions ({res['windows']} windows x {res['seq_len']} tokens from "
             f"{', '.join(res['domains'])}). Calibration: {res['calibration']['tokens']} tokens of the embedded "
             f"calibration sample. Generated by `python bench/quality_sweep.py` ({res['total_s']} s, "
             f"{res['threads']} thread). Expert bpw = stored expert bytes (page padding and scales included) x 8 / "
             "expert weights (of the kept experts); file MB = all shard bytes.",
             *_partial_note(res),
             "",
             "| section | arm | level | expert bpw | file MB | ppl | Δppl | KL | top-1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['section']} | {r['arm']} | {'' if r['level'] is None else r['level']} | "
                     f"{_bits(r)} | {r['file_bytes'] / 1e6:.2f} | {r['ppl']:.3f} | "
                     f"{100 * r['ppl_increase']:+.2f}% | {r['kl_mean']:.5f} | {100 * r['top1_agreement']:.2f}% |")
    return "\n".join(lines + [""] + summary(res)) + "\n"


def _partial_note(res: dict) -> list[str]:
    out = []
    for p in res.get("partial_runs", []):
        c = p["check"]
        out += ["", f"Rows `{', '.join(p['arms'])}` were added later by `python bench/quality_sweep.py --only "
                f"{p['only']}` ({p['total_s']} s, {p['threads']} thread) and merged into this table; that run "
                f"re-measured `{c['arm']}` as a check: KL {c['kl_mean_rerun']:.6f} vs {c['kl_mean_stored']:.6f} "
                f"stored, ppl {c['ppl_rerun']:.3f} vs {c['ppl_stored']:.3f}."]
    return out


def _find(res: dict, arm: str, level=None) -> dict | None:
    for r in res["rows"]:
        if r["arm"] == arm and (level is None or r["level"] == level):
            return r
    return None


def _fmt(r: dict | None) -> str:
    if r is None:
        return "n/a"
    return (f"{_bits(r)} bpw experts, {r['file_bytes'] / 1e6:.2f} MB: Δppl {100 * r['ppl_increase']:+.2f}%, "
            f"KL {r['kl_mean']:.5f}, top-1 {100 * r['top1_agreement']:.2f}%")


def summary(res: dict) -> list[str]:
    """The comparisons the issue asks for, read off the table."""
    out = ["## Summary (generated)", ""]
    for ratio in (25, 50):
        rows = [r for r in res["rows"] if r["section"] == "prune" and r["prune"] == ratio / 100]
        rows.sort(key=lambda r: r["kl_mean"])
        out.append(f"- pruning {ratio} % (experts f16), criteria by KL: " + "; ".join(
            f"{r['criterion']} KL {r['kl_mean']:.5f} / Δppl {100 * r['ppl_increase']:+.2f}%" for r in rows))
    for ratio in (25, 50):
        for c in ADAPTIVE_CRITERIA:
            a, u = _find(res, f"prune{ratio}_{c}_adaptive"), _find(res, f"prune{ratio}_{c}")
            if a is None or u is None:
                continue
            out.append(f"- pruning {ratio} %, {c}: adaptive (experts per layer {a.get('experts_per_layer')}) KL "
                       f"{a['kl_mean']:.5f} / Δppl {100 * a['ppl_increase']:+.2f}% / top-1 "
                       f"{100 * a['top1_agreement']:.2f}% vs uniform KL {u['kl_mean']:.5f} / Δppl "
                       f"{100 * u['ppl_increase']:+.2f}% / top-1 {100 * u['top1_agreement']:.2f}%")
    for codec, lv in (("matryoshka_floor", 1), ("matryoshka", 1), ("residual", 2)):
        out.append(f"- 4-bit level of {codec} (level {lv}): {_fmt(_find(res, codec, lv))}")
    for q in ("q8_0", "q4_0"):
        out.append(f"- uniform {q}: {_fmt(_find(res, f'uniform_{q}'))}; at the same size: matryoshka_floor "
                   f"{_fmt(_find(res, f'matryoshka_floor_at_{q}_size'))}; residual "
                   f"{_fmt(_find(res, f'residual_at_{q}_size'))}")
    best = res["best_criterion_at_25"]
    for crit in sorted({"reap", best}):
        r = _find(res, f"prune25_{crit}_matryoshka_floor", 1)
        a = _find(res, f"prune25_{crit}_matryoshka_floor_4bpw")
        verdict = "meets" if r is not None and r["ppl_increase"] <= 0.03 else "misses"
        out.append(f"- compass (≤ 3 % ppl at 25 % pruning + ≈4-bit experts), {crit}: matryoshka_floor level 1 "
                   f"{_fmt(r)} -> {verdict}; with --size-budget 4bpw: {_fmt(a)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--heldout", default=str(DEFAULT_MODEL / "heldout"))
    ap.add_argument("--calib", default=str(DEFAULT_MODEL / "calibration"))
    ap.add_argument("--windows", type=int, default=8, help="held-out windows per domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "compression_quality"))
    ap.add_argument("--only", choices=["adaptive"], default=None,
                    help="run only the adaptive pruning arms and merge them into the existing --out JSON/Markdown")
    args = ap.parse_args()
    res = run(args)
    out = Path(args.out)
    if args.only:
        res = merge_partial(json.loads(out.with_suffix(".json").read_text()), res)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
        print(json.dumps({"merged": res["partial_runs"][-1]}))
        return
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(json.dumps({"ref_ppl": res["ref_ppl"], "arms": len(res["rows"]), "total_s": res["total_s"],
                      "best_criterion_at_25": res["best_criterion_at_25"]}))


if __name__ == "__main__":
    main()
