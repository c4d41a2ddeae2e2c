"""Child process of the benchmark: one moestream arm through the public Python API.

``python -m moestream.bench.run_arm MODEL --tokens FILE --mode teacher|greedy -n N
[--memory SIZE] [--cache-policy P] [--precision-policy P] [--level L] [--threads T] [--passes 2]
[--profile-dir DIR]`` loads the model with :class:`moestream.engine.api.Engine`
(the same call ``moestream run`` makes), then times prefill and ``N`` decode
steps per pass exactly like :mod:`moestream.bench.llama_runner` does for
llama.cpp (``bench/arm_common.py``): the engine's own model forward over its
own KV cache, one token per step. Teacher forcing feeds real text (needed on
random-weight models, where greedy decoding loops over a few experts); greedy
feeds the argmax (the same tokens ``moestream run`` would produce at
temperature 0). Prints one ``BENCH_RESULT {json}`` line with the per-pass
timings and the engine's counters (hits, misses, bytes read, stall) before and
after each pass.

With ``--profile-dir``, after the timed passes the prompt is run once more under
``cProfile`` and three decode steps each under ``torch.profiler`` and
``cProfile``, then the prompt again and every teacher-forced step with per-component hooks
(``bench/step_profile.py``: attention projections, experts, LM head, ...); their tables are
written there.

It is a child-process entry, not a library: the harness never imports it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

from moestream.bench.arm_common import emit, read_tokens, time_pass


def _expert_counters(engine) -> dict:
    """Flat cache counters from ``engine.stats()['experts']`` (empty for resident providers)."""
    ex = (engine.stats().get("experts") or {})
    tot = ex.get("totals") or {}
    loader = ex.get("loader") or {}
    return {"hits": tot.get("hits"), "misses": tot.get("misses"), "fallbacks": tot.get("fallbacks"),
            "stall_s": tot.get("stall_s"), "prefetch_issued": tot.get("prefetch_issued"),
            "prefetch_used": tot.get("prefetch_used"), "bytes_read": loader.get("bytes_read"),
            "read_seconds": loader.get("read_seconds"), "reads": loader.get("reads"),
            "direct_reads": loader.get("direct_reads")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one moestream benchmark arm (child process)")
    p.add_argument("model")
    p.add_argument("--tokens", required=True, help="JSON {prompt: [ids], forced: [ids]}")
    p.add_argument("--mode", choices=("teacher", "greedy"), default="teacher")
    p.add_argument("-n", type=int, default=32, help="decode steps")
    p.add_argument("--memory")
    p.add_argument("--ctx", type=int)
    p.add_argument("--cache-policy", default="lru")
    p.add_argument("--precision-policy", default="exact")
    p.add_argument("--level", type=int, help="nested-codec shards: highest level to use (default: the highest)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--passes", type=int, default=2, help="1 = cold only; 2 = cold then warm")
    p.add_argument("--profile-dir")
    p.add_argument("--activations", choices=("int8", "fp32"),
                   help="nested-codec experts: native-kernel activation mode (default: the engine's)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from moestream.engine.api import Engine

    if args.activations:
        from moestream.engine import native_kernels

        native_kernels.set_activation_mode(args.activations)

    prompt, forced = read_tokens(args.tokens)
    t0 = time.perf_counter()
    try:
        engine = Engine.load(args.model, memory=args.memory, device="cpu", ctx=args.ctx,
                             precision_policy=args.precision_policy, cache_policy=args.cache_policy,
                             level=args.level)
    except Exception as exc:  # a refusal (BudgetError) is a result, reported as such
        emit({"engine": "moestream", "ok": False, "error_type": type(exc).__name__, "error": str(exc)})
        return 2
    load_s = time.perf_counter() - t0
    model, cache = engine.model, engine.cache

    def prefill(ids):
        logits = None
        for i in range(0, len(ids), 512):
            logits = model(torch.tensor([list(ids[i:i + 512])], dtype=torch.long), cache)[0, -1]
        return logits.float().numpy()

    def step(tok: int):
        return model(torch.tensor([[tok]], dtype=torch.long), cache)[0, -1].float().numpy()

    passes = []
    with torch.inference_mode():
        for i in range(args.passes):
            r = time_pass(prefill, step, cache.reset, prompt, forced, args.n, args.mode,
                          stats=lambda: _expert_counters(engine))
            r["pass"] = "cold" if i == 0 else "warm"
            passes.append(r)
        if args.profile_dir:
            _profile(args.profile_dir, model, step, forced or passes[0]["tokens"], cache, prefill, prompt)
    st = engine.stats()
    emit({"engine": "moestream", "ok": True, "load_s": load_s, "threads": torch.get_num_threads(),
          "mode": args.mode, "passes": passes, "memory_plan": st.get("memory_plan"),
          "memory_budget_bytes": st.get("memory_budget_bytes"), "kv_cache_bytes": st.get("kv_cache_bytes"),
          "provider": (st.get("experts") or {}).get("provider", "resident"),
          "cache_policy": args.cache_policy, "precision_policy": args.precision_policy, "level": args.level,
          "arena_slots": (st.get("experts") or {}).get("arena_slots"),
          "experts_total": (st.get("experts") or {}).get("experts_total"),
          "versions": {"torch": torch.__version__, "numpy": np.__version__}})
    engine.close()
    return 0


def _profile(out_dir: str, model, step, tokens, cache, prefill, prompt) -> None:
    """Decode steps under torch.profiler, cProfile and per-component hooks (bench/step_profile.py); tables in ``out_dir``."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache.reset()
    pr = cProfile.Profile()
    pr.enable()
    prefill(prompt)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    (out / "cprofile_prefill.txt").write_text(f"prefill of {len(prompt)} tokens (warm), cProfile, sorted by tottime\n"
                                              + s.getvalue())
    step(int(tokens[0]))  # one step outside the profile (first-touch effects)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for tok in tokens[1:4]:
            step(int(tok))
    (out / "torch_profile_decode_step.txt").write_text(
        "3 decode steps, torch.profiler, sorted by self CPU time\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    pr = cProfile.Profile()
    pr.enable()
    for tok in tokens[4:7]:
        step(int(tok))
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    (out / "cprofile_decode_step.txt").write_text("3 decode steps, cProfile, sorted by tottime\n" + s.getvalue())
    from moestream.bench.step_profile import format_table, profile_components

    cache.reset()
    prefill(prompt)
    res = profile_components(model, step, tokens)
    (out / "components_decode_step.json").write_text(json.dumps(res, indent=1))
    (out / "components_decode_step.md").write_text(format_table(res))


if __name__ == "__main__":
    sys.exit(main())
