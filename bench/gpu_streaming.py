"""Streaming experts on an accelerator: decode tok/s and memory at several expert-arena budgets.

Builds (or reuses) a synthetic Qwen3-30B-A3B-shaped model (``bench/synthetic.py``;
random weights, so timing and memory only), converts it to moestream shards,
then for each arm — ``(device, budget)`` — loads it with ``Engine.load`` and
times a teacher-forced decode of real text (the held-out python file of the
embedded model), one token per forward, after a short prefill: a cold pass
(the arena starts empty, so first uses read from disk) and then a warm pass
over the same text (the arena holds what fits; at budget 1 every expert). Arms run
interleaved over ``--reps`` repetitions, so A and B see the same machine state.

``--codec matryoshka_floor`` (or another nested codec) converts the same checkpoint with
that codec instead (no calibration: plain min/max ranges; timing only) and ``--levels`` adds
one arm per nested level; on ``cuda`` the plane bytes stay in the device arena and experts are
decoded there (``PlaneDecoder``), on ``cpu`` the native kernels compute from them.

Budgets are fractions of the full expert arena on top of the planner's
minimum (``0`` = the minimum: one token's experts; ``1`` = every expert fits).
Reported per arm: cold and warm decode tok/s (medians over reps), cache hits/misses
(both passes),
bytes read from disk, host->device copy seconds (the CUDA copy stream),
stall seconds, peak device memory (``torch.cuda.max_memory_allocated``) beside
the budget, and peak host RSS. Results go to a JSON file with the machine,
GPU, commit and versions.

    python bench/gpu_streaming.py --root /tmp/gpu_bench --out bench/results/gpu_streaming.json

Knows nothing about llama.cpp; the CPU-vs-llama.cpp comparison is ``bench/harness.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moestream.bench.harness import machine_info
from moestream.bench.synthetic import QUALITY_NOTE, SyntheticSpec, build_synthetic
from moestream.convert.shard_reader import ShardedModel
from moestream.engine.api import Engine
from moestream.engine.planning import all_experts_arena_bytes, min_streaming_budget
from moestream.engine.streaming import COMPILE_DECODE_ENV, shard_footprint

REPO = Path(__file__).resolve().parent.parent

TEXT = REPO / "engine" / "default_model" / "heldout" / "python.txt"


def budget_bytes(shards: Path, ctx: int, fraction: float, device: str = "cpu") -> int:
    """The planner's minimum on ``device`` plus ``fraction`` of the bytes every expert needs in the arena."""
    with ShardedModel.open(shards, verify="off") as r:
        fp = shard_footprint(r, ctx, device)
    return int(min_streaming_budget(fp) + fraction * all_experts_arena_bytes(fp))


def nested_shards(hf: Path, out: Path, codec: str, group_size: int) -> Path:
    """``hf`` converted with a nested expert codec into ``out`` (reused when already there)."""
    if not any(out.glob("*.gguf")):
        from moestream.convert.compress import CompressOptions, compress_checkpoint

        compress_checkpoint(hf, out, CompressOptions(codec=codec, group_size=group_size), progress=True)
    return out


def arms(args: argparse.Namespace, levels: list[int | None]) -> list[tuple[str, float, int | None, str]]:
    """``(device, budget fraction, level, decode)`` per arm; decode arms only where they differ (nested on cuda)."""
    out = []
    for device in args.devices:
        decodes = args.gpu_decode if device.startswith("cuda") and args.codec != "none" else ["-"]
        out += [(device, f, lv, d) for f in args.fractions for lv in levels for d in decodes]
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def _decode_pass(model: Any, ids: torch.Tensor, prefill: int, ctx: int, device: str) -> list[float]:
    """Prefill, then one forward per remaining token; seconds per decoded token."""
    cache = model.make_cache(1, ctx, device=device)
    per_token = []
    with torch.no_grad():
        model(ids[:, :prefill], cache)
        _sync(device)
        for t in range(prefill, ids.shape[1]):
            start = time.perf_counter()
            model(ids[:, t:t + 1], cache)
            _sync(device)
            per_token.append(time.perf_counter() - start)
    return per_token


def run_arm(shards: Path, device: str, fraction: float, tokens: list[int], prefill: int, ctx: int,
            level: int | None = None, decode: str = "compiled") -> dict[str, Any]:
    """Load, then two passes over the same text: cold (the arena starts empty) and warm (it holds what fits).

    ``decode``: how a CUDA arena decodes nested experts (``compiled`` or ``eager``; see ``COMPILE_DECODE_ENV``).
    """
    memory = budget_bytes(shards, ctx, fraction, device)
    os.environ[COMPILE_DECODE_ENV] = "1" if decode == "compiled" else "0"
    gc.collect()  # the previous arm's model and arena (reference cycles) must be gone before measuring
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    device_at_start = torch.cuda.memory_allocated() if device.startswith("cuda") else None
    dropped = _drop_page_cache()
    t0 = time.perf_counter()
    with Engine.load(shards, memory=memory, device=device, ctx=ctx, level=level) as engine:
        load_s = time.perf_counter() - t0
        ids = torch.tensor([tokens], device=device)
        cold = _decode_pass(engine.model, ids, prefill, ctx, device)
        warm = _decode_pass(engine.model, ids, prefill, ctx, device)
        st = engine.stats()["experts"]
    peak = torch.cuda.max_memory_allocated() - device_at_start if device.startswith("cuda") else None
    decode_s = sum(cold)
    totals = st["totals"]
    return {
        "device": device, "budget_fraction": fraction, "budget_bytes": memory, "page_cache_dropped": dropped,
        "level": level, "device_decode": st.get("device_decode"), "native_nested_kernel": st.get("native_nested_kernel"),
        "decode": decode if st.get("device_decode") else None, "compiled_decode": st.get("compiled_decode"),
        "load_s": load_s, "decode_tokens": len(cold), "decode_s": decode_s,
        "decode_tok_s": len(cold) / decode_s, "median_token_ms": 1000 * statistics.median(cold),
        "warm_decode_tok_s": len(warm) / sum(warm), "warm_median_token_ms": 1000 * statistics.median(warm),
        "device_bytes_at_start": device_at_start,
        "hits": totals["hits"], "misses": totals["misses"], "hit_rate": totals["hit_rate"],
        "stall_s": totals["stall_s"], "prefetch_accuracy": totals["prefetch_accuracy"],
        "bytes_read": st["loader"]["bytes_read"], "read_bandwidth": st["loader"]["read_bandwidth_bytes_per_s"],
        "arena_bytes": st["arena"]["nbytes"], "arena_device": st["arena"]["device"],
        "transfer": st["transfer"],
        "peak_device_bytes": peak,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def gpu_info() -> dict[str, Any]:
    """Name, memory and CUDA version of the first GPU (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "total_memory_bytes": p.total_memory, "multiprocessors": p.multi_processor_count,
            "cuda": torch.version.cuda}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="where the synthetic model is built (big: not the repo)")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=SyntheticSpec.experts)
    p.add_argument("--hidden", type=int, default=SyntheticSpec.hidden)
    p.add_argument("--expert-inter", type=int, default=SyntheticSpec.expert_inter)
    p.add_argument("--shard-dtype", choices=("f32", "f16", "bf16"), default="bf16")
    p.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.0])
    p.add_argument("--tokens", type=int, default=80, help="prompt + decoded tokens per arm")
    p.add_argument("--prefill", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--codec", default="none",
                   help="expert codec of the timed shards: none (the --shard-dtype shards) or a nested codec "
                        "(matryoshka_floor, matryoshka, residual; converted without calibration)")
    p.add_argument("--group-size", type=int, default=128, help="nested codec group length")
    p.add_argument("--levels", nargs="+", type=int, default=None,
                   help="nested levels to time, one arm each (default: each expert's highest stored level)")
    p.add_argument("--gpu-decode", nargs="+", choices=("compiled", "eager"), default=["compiled"],
                   help="nested codecs on cuda: decode arms (torch.compile'd fused decode and/or the eager one)")
    p.add_argument("--commit", default=None, help="commit to record when the tree has no .git")
    args = p.parse_args(argv)

    spec = SyntheticSpec(layers=args.layers, experts=args.experts, hidden=args.hidden,
                         expert_inter=args.expert_inter, top_k=min(SyntheticSpec.top_k, args.experts))
    t0 = time.perf_counter()
    paths = build_synthetic(args.root, spec, shard_dtype=args.shard_dtype, gguf_qtypes=(), progress=False)
    shards = Path(paths[f"moestream_{args.shard_dtype}"])
    if args.codec != "none":
        shards = nested_shards(Path(paths["hf"]), args.root / f"shards_{args.codec}_g{args.group_size}",
                               args.codec, args.group_size)
    build_s = time.perf_counter() - t0
    levels: list[int | None] = list(args.levels) if args.levels else [None]
    tok = json.loads((Path(paths["hf"]) / "tokenizer.json").read_text())
    from tokenizers import Tokenizer

    tokens = Tokenizer.from_str(json.dumps(tok)).encode(TEXT.read_text()).ids[:args.tokens]
    records = []
    for rep in range(args.reps):  # interleaved: every arm once per repetition
        for device, fraction, level, decode in arms(args, levels):
            rec = run_arm(shards, device, fraction, tokens, args.prefill, args.ctx, level, decode)
            rec["rep"] = rep
            rec["arm_decode"] = decode
            records.append(rec)
            print(f"rep {rep} {device:5s} {decode:8s} level {level} budget {fraction:4.2f}: "
                  f"cold {rec['decode_tok_s']:7.2f} tok/s, "
                  f"warm {rec['warm_decode_tok_s']:7.2f} tok/s, "
                  f"hit {rec['hit_rate'] or 0:.2f}, read {rec['bytes_read'] / 2**20:8.1f} MiB, "
                  f"peak dev {(rec['peak_device_bytes'] or 0) / 2**20:8.1f} MiB "
                  f"(budget {rec['budget_bytes'] / 2**20:8.1f} MiB)", flush=True)
    summary = []
    for device, fraction, level, decode in arms(args, levels):
        rs = [r for r in records if r["device"] == device and r["budget_fraction"] == fraction
              and r["level"] == level and r["arm_decode"] == decode]
        summary.append({"device": device, "budget_fraction": fraction, "level": level, "decode": decode,
                        "budget_bytes": rs[0]["budget_bytes"],
                        "decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rs),
                        "decode_tok_s_all": [r["decode_tok_s"] for r in rs],
                        "warm_decode_tok_s_median": statistics.median(r["warm_decode_tok_s"] for r in rs),
                        "hit_rate": rs[0]["hit_rate"],
                        "peak_device_bytes_max": max((r["peak_device_bytes"] or 0) for r in rs) or None})
    machine = machine_info()
    if args.commit:  # a copy of the tree without .git (a lent GPU machine): the caller names the commit
        machine["git_commit"] = args.commit
    doc = {"benchmark": "gpu_streaming", "note": QUALITY_NOTE, "machine": machine, "gpu": gpu_info(),
           "spec": spec.__dict__, "shard_dtype": args.shard_dtype, "codec": args.codec, "build_s": build_s,
           "model_bytes": sum(f.stat().st_size for f in shards.glob("*.gguf")),
           "settings": {k: str(v) for k, v in vars(args).items()}, "records": records, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
