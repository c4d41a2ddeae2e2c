"""A/B of the single-token decode path: the lean path (``blocks.FAST_DECODE``) against the general one.

Owns :func:`ab_decode`, which times decode steps of one loaded model in three arms — ``general``
(switch off), ``fast_torch`` (lean path, torch ops only) and ``fast`` (lean path with the native
norm / RoPE / cache-write helpers of ``engine/decode_kernels.py``) — interleaved step by step at the
same cache positions (each step runs every arm, in rotating order, rewinding the cache by one
position before each), so the arms see the same machine load, positions and expert and projection
kernels; the differences are the Python / torch dispatch the lean path removes. The time inside the
native matrix / expert kernels is clocked and subtracted too (``outside_kernels_ms``). Optionally a
per-component table (``bench/step_profile.py``) for ``fast`` and ``general``.

Models: ``--model PATH`` (anything ``Engine.load`` opens, e.g. a converted shard folder from
``/work/bench_data/syn_dense_q/paths.json``) or ``--synthetic`` (a random fp32 ``qwen3_moe`` of the
Qwen3-30B-A3B attention/router shape with few layers and few resident experts, built in memory).
Decode is teacher-forced on fixed token ids (random-weight models loop under greedy decoding).

Writes ``bench/results/decode_overhead.json`` (or ``--out``) and ends with one JSON line.

Knows nothing about files beyond ``Engine.load``; the model internals it switches live in
``engine/models/blocks.py``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from moestream.engine.models import blocks

REPO = Path(__file__).resolve().parent.parent


def synthetic_model(layers: int = 2, experts: int = 16, seed: int = 0) -> torch.nn.Module:
    """A random fp32 ``qwen3_moe`` (hidden 2048, 32/4 heads of 128, top-8, width 768, vocab 8192), resident experts."""
    from moestream.engine.experts import ResidentExperts
    from moestream.engine.models import get_model_classes

    model_cls, args_cls = get_model_classes("qwen3_moe")
    args = args_cls.from_config({"model_type": "qwen3_moe", "vocab_size": 8192, "hidden_size": 2048,
                                 "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4,
                                 "head_dim": 128, "num_experts": experts, "num_experts_per_tok": 8,
                                 "moe_intermediate_size": 768, "norm_topk_prob": True, "rms_norm_eps": 1e-6})
    g = torch.Generator().manual_seed(seed)
    model = model_cls(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        h, i = 2048, 768
        gate_up = {l: torch.randn(experts, 2 * i, h, generator=g) * h ** -0.5 for l in range(layers)}
        down = {l: torch.randn(experts, h, i, generator=g) * i ** -0.5 for l in range(layers)}
    model.set_expert_provider(ResidentExperts(gate_up, down))
    return model


class KernelClock:
    """Wall time spent inside the native kernels (dense ``dq_linear`` and the fused MoE call), to subtract.

    Wraps ``dense_kernels._native`` and ``experts.moe_ffn`` (the names the engine calls) while active;
    the wrapper costs ~0.3 µs per call, charged to the kernels.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, owner: object, name: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0

        self._saved.append((owner, name, fn))
        setattr(owner, name, timed)

    def __enter__(self) -> "KernelClock":
        from moestream.engine import dense_kernels, experts

        self._wrap(dense_kernels, "_native")
        self._wrap(experts, "moe_ffn")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()


#: The arms: ``blocks`` switches of each (FAST_DECODE, NATIVE_ATTENTION, NATIVE_NORM_MAX).
ARMS = {"general": (False, True, blocks.NATIVE_NORM_MAX),
        "fast_torch": (True, False, 0),  # the lean path without the native helpers
        "fast": (True, True, blocks.NATIVE_NORM_MAX)}


def _set_arm(arm: str) -> None:
    blocks.FAST_DECODE, blocks.NATIVE_ATTENTION, blocks.NATIVE_NORM_MAX = ARMS[arm]


def ab_decode(model: torch.nn.Module, cache, prompt: list[int], tokens: list[int]) -> dict:
    """Time each decode step in every arm of :data:`ARMS`, interleaved at the same positions.

    Each step runs all arms in a rotating order, rewinding the cache by one position before each.

    Args:
        model: a ``MoECausalLM`` with its expert provider set.
        cache: its KV cache (reset here).
        prompt: prefill ids.
        tokens: teacher-forced decode ids (one step each, every arm).

    Returns:
        ``{"steps", "ms": {arm: median step}, "outside_kernels_ms": {arm: median step minus its native
        kernel time}, "saved_ms": {arm: median over steps of (general - arm)}, "saved_outside_kernels_ms",
        "saved_ms_quartiles", "max_abs_logit_diff": {arm: vs general}}`` (int8 activation rounding
        amplifies the fp32-rounding differences of the paths on quantized models).
    """
    names = list(ARMS)
    step: dict[str, list[float]] = {a: [] for a in names}
    outside: dict[str, list[float]] = {a: [] for a in names}
    max_diff = {a: 0.0 for a in names}
    try:
        with torch.inference_mode(), KernelClock() as clock:
            for _ in range(2):  # the first prefill also loads every expert it routes to (streaming providers)
                cache.reset()
                model(torch.tensor([prompt]), cache)
            for i, tok in enumerate(tokens):
                pos = cache.seq_len
                ids = torch.tensor([[tok]])
                logits = {}
                for arm in names[i % len(names):] + names[:i % len(names)]:
                    cache.seq_len = pos
                    _set_arm(arm)
                    clock.seconds = 0.0
                    t0 = time.perf_counter()
                    logits[arm] = model(ids, cache)
                    dt = time.perf_counter() - t0
                    step[arm].append(dt)
                    outside[arm].append(dt - clock.seconds)
                for arm in names:
                    max_diff[arm] = max(max_diff[arm], float((logits[arm] - logits["general"]).abs().max()))
    finally:
        _set_arm("fast")
    med = lambda v: 1e3 * statistics.median(v)  # noqa: E731
    diff = lambda d, a: [g - f for f, g in zip(d[a], d["general"])]  # noqa: E731
    return {"steps": len(tokens), "ms": {a: med(step[a]) for a in names},
            "outside_kernels_ms": {a: med(outside[a]) for a in names},
            "saved_ms": {a: med(diff(step, a)) for a in names},
            "saved_outside_kernels_ms": {a: med(diff(outside, a)) for a in names},
            "saved_ms_quartiles": {a: [1e3 * q for q in statistics.quantiles(diff(step, a), n=4)] for a in names},
            "max_abs_logit_diff": max_diff}


def components(model: torch.nn.Module, cache, prompt: list[int], tokens: list[int]) -> dict:
    """Per-component tables (``bench/step_profile.py``) with the lean path on and off."""
    from moestream.bench.step_profile import profile_components

    out = {}
    try:
        with torch.inference_mode():
            for arm in ("fast", "general"):
                _set_arm(arm)
                cache.reset()
                model(torch.tensor([prompt]), cache)

                def step(tok: int) -> None:
                    model(torch.tensor([[tok]]), cache)

                out[arm] = profile_components(model, step, tokens)
    finally:
        _set_arm("fast")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model Engine.load opens (shard folder, HF folder, .gguf)")
    src.add_argument("--synthetic", action="store_true", help="a random in-memory qwen3_moe of the 30B-A3B shape")
    p.add_argument("--layers", type=int, default=2, help="--synthetic: decoder layers (default 2)")
    p.add_argument("--experts", type=int, default=16, help="--synthetic: routed experts per layer (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens (default 128)")
    p.add_argument("--steps", type=int, default=64, help="decode steps per arm (default 64)")
    p.add_argument("--components", action="store_true", help="also a per-component table per arm")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "decode_overhead.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    vocab = 8192
    if args.synthetic:
        model = synthetic_model(args.layers, args.experts)
        cache = model.make_cache(1, args.prompt + args.steps + 1)
        name = f"synthetic qwen3_moe fp32, {args.layers} layers, {args.experts} experts"
    else:
        from moestream.engine.api import Engine

        engine = Engine.load(args.model, device="cpu", ctx=args.prompt + args.steps + 1)
        model, cache, name = engine.model, engine.cache, args.model
        vocab = int(model.args.vocab_size)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (args.prompt + args.steps,), generator=g).tolist()
    prompt, tokens = ids[:args.prompt], ids[args.prompt:]
    res = {"model": name, "threads": args.threads, "prompt": args.prompt,
           "ab": ab_decode(model, cache, prompt, tokens)}
    if args.components:
        res["components"] = components(model, cache, prompt, tokens)
    from moestream.bench.harness import machine_info

    res["machine"] = machine_info()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"schema": "moestream.bench.decode_overhead/1", "runs": []}
    doc["runs"].append(res)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    ab = res["ab"]
    ms, out_ms, saved = ab["ms"], ab["outside_kernels_ms"], ab["saved_ms"]
    print(f"{name}: ms/token (median of {ab['steps']} interleaved steps) general {ms['general']:.2f}, "
          f"fast_torch {ms['fast_torch']:.2f}, fast {ms['fast']:.2f}; saved per step vs general: fast_torch "
          f"{saved['fast_torch']:.2f}, fast {saved['fast']:.2f}; outside the native kernels general "
          f"{out_ms['general']:.2f}, fast_torch {out_ms['fast_torch']:.2f}, fast {out_ms['fast']:.2f}", file=sys.stderr)
    print(json.dumps({"model": name, **ab}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
