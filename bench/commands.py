"""``moestream bench``: memory-budget benchmarks against llama.cpp under kernel-enforced limits.

Owns the verb (registered by ``engine/cli.py`` like the convert/scheduler verbs)
and the preparation of each suite's models and inputs:

- ``--quick``: the embedded default model (converted once to moestream shards
  and to a llama.cpp GGUF under ``--work-dir``), budgets 100/50/25 %, one
  repetition, greedy; prints the comparison table (a few minutes);
- ``--suite default``: the same model, budgets 100/75/50/25 %, 3 interleaved
  repetitions, greedy decoding (a trained model);
- ``--suite synthetic --data DIR``: a synthetic Qwen3-30B-A3B-shaped model
  built by ``bench/synthetic.py`` (``python -m moestream.bench.synthetic DIR``),
  decode teacher-forced on real text (random weights loop under greedy);
- ``--suite resident --data DIR``: the synthetic model with no limit, moestream
  vs llama.cpp at each exported precision, plus a profile of decode steps;
- ``--suite nested``: the embedded model converted with the nested codec
  (``matryoshka_floor``: 2/4/8-bit levels in one file) run at each level beside
  its f32 shards and llama.cpp F32 / Q8_0 / Q4_0 exports, budgets 100/50/25 %.

Results go to ``--out`` (default ``bench/results``) as ``<suite>.json``,
``<suite>.md`` and PNG plots. Knows nothing about engine internals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from moestream.bench import harness, report
from moestream.bench.harness import Arm, SuiteConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO / "engine" / "default_model"
DEFAULT_WORK = Path(os.environ.get("MOESTREAM_BENCH_DIR", Path.home() / ".cache" / "moestream" / "bench"))
TEXT_FILE = DEFAULT_MODEL_DIR / "heldout" / "fortunes.txt"
SYNTHETIC_NOTE = ("SYNTHETIC random-weight model with Qwen3-30B-A3B shapes (hidden 2048, 128 experts, top-8, expert "
                  "width 768, 32/4 heads of 128): timing and memory only, no quality numbers; decode is "
                  "teacher-forced on real text because greedy decoding on random weights loops over a few experts")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` verb."""
    p = subparsers.add_parser(
        "bench", help="memory-budget benchmark vs llama.cpp (kernel-enforced limits)",
        description=__doc__.split("\n\n")[0] + "\n\nExamples:\n"
        "  moestream bench --quick\n"
        "  moestream bench --suite default\n"
        "  python -m moestream.bench.synthetic /data/syn6 --gguf q8_0 f16 && "
        "moestream bench --suite synthetic --data /data/syn6\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="default model, 100/50/25 %%, 1 repetition (minutes)")
    p.add_argument("--suite", choices=("default", "synthetic", "resident", "nested"), default="default")
    p.add_argument("--data", help="synthetic model folder (bench/synthetic.py output)")
    p.add_argument("--budgets", type=float, nargs="+", metavar="PCT", help="budget percentages (default per suite)")
    p.add_argument("--reps", type=int, help="interleaved repetitions per budget (default 3, quick 1)")
    p.add_argument("-n", "--decode-steps", type=int, help="decode steps per pass")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both engines")
    p.add_argument("--policies", nargs="+", default=["lru"], choices=("lru", "lfu", "consistency"),
                   help="moestream cache policies (one arm each)")
    p.add_argument("--precision", nargs="+", default=["exact"], choices=("exact", "adaptive"),
                   help="moestream precision policies (one arm each)")
    p.add_argument("--llama", nargs="+", metavar="QTYPE", help="llama.cpp formats to run (default per suite)")
    p.add_argument("--moestream", nargs="+", metavar="DTYPE",
                   help="moestream shard formats from the data folder's paths.json (default: all listed)")
    p.add_argument("--levels", type=int, nargs="+", metavar="J",
                   help="nested-codec formats: the stored levels to run, one arm each (default all)")
    p.add_argument("--activations", nargs="+", default=["int8"], choices=("int8", "fp32"),
                   help="nested-codec arms: native-kernel activation modes, one arm each (default int8; fp32 = exact)")
    p.add_argument("--profile", action="store_true",
                   help="resident suite: profile decode steps of each moestream arm (torch.profiler + cProfile)")
    p.add_argument("--mode", choices=("teacher", "greedy"), help="decode mode (default: greedy for the trained "
                   "default model, teacher for synthetic models)")
    p.add_argument("--passes", type=int, default=2, help="1 = cold pass only, 2 = cold then warm")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child run")
    p.add_argument("--analysis", help="moestream analyze report.json for the hit-rate plot (Belady bound)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK), help="where the default model's conversions go")
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                   help="HF folder of the default suite's model (default: the embedded model)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder")
    p.add_argument("--tag", help="suffix of the result file names")
    p.set_defaults(func=cmd_bench)


def prepare_default(work: Path, llama_qtypes: list[str], model_dir: Path = DEFAULT_MODEL_DIR) -> dict[str, str]:
    """Convert the embedded default model (or ``model_dir``) once: moestream f32 shards + llama.cpp GGUF(s).

    Raises:
        FileNotFoundError: the model folder has no config.json / safetensors.
    """
    from moestream.convert.convert import convert_checkpoint
    from moestream.convert.llamacpp_export import export_llamacpp

    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir} has no config.json + *.safetensors: the model is not installed")
    stamp = str(int(max(f.stat().st_mtime for f in model_dir.glob("*.safetensors"))))
    root = work / f"default_{stamp}"
    shards = root / "shards_f32"
    if not any(shards.glob("*.gguf")):
        convert_checkpoint(model_dir, shards, dtype="f32", progress=False)
    paths = {"moestream_f32": str(shards)}
    for q in llama_qtypes:
        out = root / f"llamacpp_{q}.gguf"
        if not out.is_file():
            export_llamacpp(model_dir, out, q, progress=False)
        paths[f"llamacpp_{q}"] = str(out)
    return paths


NESTED_CODEC = "matryoshka_floor"


def prepare_nested(work: Path, model_dir: Path = DEFAULT_MODEL_DIR) -> tuple[str, int]:
    """The embedded model converted once with the nested codec; returns (shard folder, stored levels)."""
    from moestream.convert.compress import CompressOptions, compress_checkpoint

    stamp = str(int(max(f.stat().st_mtime for f in model_dir.glob("*.safetensors"))))
    shards = work / f"default_{stamp}" / f"shards_{NESTED_CODEC}"
    if not any(shards.glob("*.gguf")):
        compress_checkpoint(model_dir, shards, CompressOptions(codec=NESTED_CODEC), progress=False)
    return str(shards), _stored_levels(str(shards))


def _stored_levels(shards: str) -> int:
    from moestream.convert.shards import ShardedModel

    with ShardedModel.open(shards, verify="off") as r:
        return max(r.n_levels(l, e) for l, e in r.expert_keys())


def _nested_arms(shards: str, levels: int, policies: list[str], precisions: list[str],
                 codec: str = NESTED_CODEC, only_levels: list[int] | None = None,
                 activations: tuple[str, ...] = ("int8",)) -> list[Arm]:
    """One arm per stored level (``--level j``) x policy x activation mode of a nested-codec shard model."""
    def name(j: int, pol: str, prec: str, act: str) -> str:
        return (f"moestream-{codec}-L{j}-{pol}" + ("" if prec == "exact" else f"-{prec}")
                + ("" if tuple(activations) == ("int8",) else f"-{act}act"))

    return [Arm(name(j, pol, prec, act), "moestream", shards, f"{codec}-L{j}", cache_policy=pol,
                precision_policy=prec, extra=("--level", str(j), "--activations", act))
            for j in range(levels) if only_levels is None or j in only_levels
            for pol in policies for prec in precisions for act in activations]


def _arms(paths: dict[str, str], moestream_fmts: list[str], policies: list[str], precisions: list[str],
          llama: list[str], only_levels: list[int] | None = None, activations: tuple[str, ...] = ("int8",)) -> list[Arm]:
    """One arm per moestream format x policy (nested formats: one per stored level), then llama.cpp's."""
    arms = []
    for fmt in moestream_fmts:
        shards = paths[f"moestream_{fmt}"]
        levels = _stored_levels(shards) if fmt.startswith(("matryoshka", "residual")) else 0
        if levels:
            arms += _nested_arms(shards, levels, policies, precisions, codec=fmt, only_levels=only_levels,
                                 activations=activations)
            continue
        arms += [Arm(f"moestream-{fmt}-{pol}" + ("" if prec == "exact" else f"-{prec}"), "moestream",
                     shards, fmt, cache_policy=pol, precision_policy=prec)
                 for pol in policies for prec in precisions]
    for q in llama:
        key = f"llamacpp_{q}"
        if key not in paths:
            raise FileNotFoundError(f"no llama.cpp {q} export: run `python -m moestream.bench.synthetic DIR --gguf {q}`")
        arms.append(Arm(f"llama.cpp-{q.upper()}", "llamacpp", paths[key], q.upper()))
    return arms


def _tokens(tokenizer_json: Path, out: Path, prompt: int, forced: int) -> str:
    text = TEXT_FILE.read_text(encoding="utf-8")
    harness.make_tokens_file(tokenizer_json, text, prompt, forced, out)
    return str(out)


def build_config(args: argparse.Namespace) -> tuple[SuiteConfig, dict[str, Any], str]:
    """The suite from the options (models prepared, tokens written); returns (config, physical, model path)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = "quick" if args.quick else args.suite
    name = f"{suite}{'_' + args.tag if args.tag else ''}"
    if suite in ("quick", "default", "nested"):
        llama = args.llama or (["f32", "q8_0", "q4_0"] if suite == "nested" else ["f32"])
        model_dir = Path(args.model_dir)
        paths = prepare_default(Path(args.work_dir), llama, model_dir)
        model, fmts, tok = paths["moestream_f32"], ["f32"], model_dir / "tokenizer.json"
        mode = args.mode or "greedy"
        steps = args.decode_steps or (16 if args.quick else 32)
        budgets = args.budgets or ([100, 50, 25] if args.quick else [100, 75, 50, 25])
        reps = args.reps or (1 if args.quick else 3)
        notes = [f"default model {model_dir} (trained): greedy decoding (each run's fed tokens are kept in "
                 "the results file's runs list)", "moestream shards f32 vs llama.cpp GGUF F32: the same model bytes"]
    else:
        if not args.data:
            raise SystemExit("error: --suite synthetic/resident needs --data DIR (bench/synthetic.py output)")
        paths = json.loads((Path(args.data) / "paths.json").read_text())
        fmts = args.moestream or [k.split("_", 1)[1] for k in paths if k.startswith("moestream_")]
        ref = "bf16" if "bf16" in fmts else fmts[0]  # same bytes as llama.cpp F16
        model, tok = paths[f"moestream_{ref}"], Path(paths["hf"]) / "tokenizer.json"
        llama = args.llama or sorted(k.split("_", 1)[1] for k in paths if k.startswith("llamacpp_"))
        mode = args.mode or "teacher"
        steps = args.decode_steps or 32
        budgets = args.budgets or ([100, 50, 25] if suite == "synthetic" else [])
        reps = args.reps or 3
        notes = [SYNTHETIC_NOTE]
    acts = tuple(args.activations)
    arms = _arms(paths, fmts, args.policies, args.precision, llama, args.levels, acts)
    if suite == "nested":
        nested, levels = prepare_nested(Path(args.work_dir), Path(args.model_dir))
        arms = _nested_arms(nested, levels, args.policies, args.precision, only_levels=args.levels,
                            activations=acts) + arms
        notes.append(f"{NESTED_CODEC} shards: one file, level j = planes 0..j (2/4/8-bit experts; dense f16), "
                     "each level one arm (--level j); budgets are fractions of the f32 shards' bytes")
    ctx = args.prompt_tokens + steps + 16
    tokens = _tokens(tok, out / f"{name}_tokens.json", args.prompt_tokens, steps)
    ov = harness.moestream_overhead(model, ctx)
    ref = harness.model_file_bytes(model)
    budget_list: list[tuple[str, float | None]] = [(f"{b:g}%", b / 100) for b in budgets]
    if suite == "resident":  # no kernel limit; moestream told that every expert fits
        budget_list = [("no limit", None)]
        out_prof = out / f"{name}_profile"
        arms = [a if a.engine != "moestream" else Arm(
            a.name, a.engine, a.model, a.fmt, a.cache_policy, a.precision_policy,
            memory_override=int(harness.moestream_overhead(a.model, ctx)["all_experts_budget_bytes"] * 1.02),
            extra=a.extra + (("--profile-dir", str(out_prof / a.name)) if args.profile else ())) for a in arms]
    phys = {"disk": harness.odirect_read_bandwidth(harness.largest_model_file(model)),
            "expert_bytes_per_token": ov["doctor"].get("expert_bytes_per_token"),
            "model_file_bytes": {a.name: harness.model_file_bytes(a.model) for a in arms},
            "moestream_min_budget_bytes": ov["min_budget_bytes"],
            "moestream_all_experts_budget_bytes": ov["all_experts_budget_bytes"]}
    hf_config = json.loads(((Path(args.model_dir) if suite in ("quick", "default", "nested") else Path(paths["hf"]))
                            / "config.json").read_text())
    bw = harness.memory_bandwidth()
    phys["memory_bandwidth_bytes_per_s"] = bw
    phys["active_params_per_token"] = harness.active_params_per_token(hf_config)
    phys["memory_bound_decode_tok_s"] = {a.name: harness.memory_bound_tok_s(hf_config, a.fmt, bw) for a in arms}
    cfg = SuiteConfig(name=name, arms=arms, budgets=budget_list, reference_bytes=ref,
                      overhead_bytes=ov["overhead_bytes"], tokens_file=tokens, mode=mode, decode_steps=steps,
                      reps=reps, threads=args.threads, ctx=ctx, passes=args.passes, timeout_s=args.timeout,
                      notes=notes)
    return cfg, phys, model


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the suite, write JSON/Markdown/PNG, print the table.

    Returns:
        0 (failed arms are results, not errors).
    """
    cfg, phys, _ = build_config(args)
    out = Path(args.out)
    js = out / f"{cfg.name}.json"
    quiet = bool(getattr(args, "quiet", False))
    doc = harness.run_suite(cfg, js, log=(lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr,
                                                                                         flush=True)),
                            physical=phys)
    md = report.markdown(doc)
    (out / f"{cfg.name}.md").write_text(md)
    if any(b[1] is not None for b in cfg.budgets):
        report.plot_tok_s_vs_budget([doc], out / f"{cfg.name}_tok_s_vs_budget.png",
                                    title=f"{cfg.name}: decode tok/s vs memory budget")
    report.plot_hit_rate(doc, out / f"{cfg.name}_hit_rate.png", args.analysis,
                         title=f"{cfg.name}: expert cache hit rate vs cache size")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m moestream.bench.commands ...`` (same as ``moestream bench ...``)."""
    parser = argparse.ArgumentParser(prog="moestream")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
