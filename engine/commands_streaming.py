"""``moestream doctor`` and ``moestream analyze``: library functions plus thin CLI wrappers.

Owns:

- :func:`doctor` — before a run: does the model fit the budget, the minimum
  budget, the planned split (resident / KV / workspace / I/O / expert arena),
  the disk bandwidth measured with a short O_DIRECT read of the model's own
  shard, expert bytes per token, the expected hit rate (from an ``analyze``
  report when one is found, else the no-locality estimate arena/all-experts)
  and the predicted decode speed;
- :func:`record_routing` — routing traces of a text, recorded through the
  model's routing hook in teacher-forced windows, plus the per-token accuracy
  of the next-layer prefetch hint (the engine's own hint path, run on the same
  text);
- :func:`analyze_model` — both, then ``scheduler.analysis.analyze``;
- ``register(subparsers)`` adding ``doctor`` and ``analyze`` (``analyze`` of a
  ``.npz`` trace file works as before: it is passed to the scheduler's command).

Knows nothing about HTTP or chat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moestream.convert.errors import BudgetError, ModelFormatError, MoestreamError
from moestream.engine.quantized_dense import packed_nbytes, quantized_targets
from moestream.scheduler.budget import align_up, format_bytes

log = logging.getLogger("moestream")

#: Where ``doctor`` looks for an ``analyze`` report of the embedded default model.
DEFAULT_MODEL_REPORT = Path(__file__).resolve().parents[1] / "bench" / "results" / "routing_default_model" / "report.json"
DOCTOR_READ_BYTES = 64 * 2**20
DOCTOR_READ_SECONDS = 1.0


# ------------------------------------------------------------------------------------------- doctor
def measure_disk_bandwidth(reader: Any, max_bytes: int = DOCTOR_READ_BYTES,
                           max_seconds: float = DOCTOR_READ_SECONDS, seed: int = 0) -> dict:
    """Read random experts of the model's own shards the way the engine does (O_DIRECT when aligned).

    Args:
        reader: an opened ``ShardedModel``.
        max_bytes: stop after this many bytes.
        max_seconds: or after this long.
        seed: which experts are read.

    Returns:
        ``{"bytes", "seconds", "reads", "direct_reads", "bandwidth_bytes_per_s", "read_size"}``.
    """
    from moestream.scheduler.loader import ExpertLoader

    keys = reader.expert_keys()
    order = np.random.default_rng(seed).permutation(len(keys))
    size = max(reader.expert_nbytes(*keys[0], 0), 1)
    raw = np.zeros(align_up(size, 4096) + 4096, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096
    buf = raw[start:start + align_up(size, 4096)]
    loader = ExpertLoader(n_workers=1)
    total, t0 = 0, time.perf_counter()
    try:
        for i in order:
            rng = reader.expert_plane_range(*keys[int(i)], 0)
            loader.submit(rng, buf).result()  # on a worker thread, as the engine reads (handoff included)
            total += rng.nbytes
            if total >= max_bytes or time.perf_counter() - t0 >= max_seconds:
                break
        stats = loader.stats.as_dict()
    finally:
        loader.close()
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "reads": stats["reads"], "direct_reads": stats["direct_reads"],
            "bandwidth_bytes_per_s": total / seconds if seconds > 0 else 0.0, "read_size": size}


class _RandomExperts:
    """Provider answering any id with one of a few random experts (for timing only)."""

    def __init__(self, views: list[Any], kind: str) -> None:
        self.views = views
        self.kind = kind  # what the views compute with ("fp32", "native matryoshka_floor level 2", ...)

    @classmethod
    def fp32(cls, hidden: int, inter: int, top_k: int) -> "_RandomExperts":
        """``top_k`` random fp32 experts."""
        from moestream.engine.experts import ExpertView

        gen = torch.Generator().manual_seed(0)
        views = []
        for _ in range(top_k):
            gate_up = torch.randn(2 * inter, hidden, generator=gen) * 0.05
            views.append(ExpertView(gate=gate_up[:inter], up=gate_up[inter:], gate_up=gate_up,
                                    down=torch.randn(hidden, inter, generator=gen) * 0.05))
        return cls(views, "fp32")

    @classmethod
    def like_stored(cls, reader: Any, top_k: int) -> "_RandomExperts | None":
        """``top_k`` random experts in the model's stored nested codec at its highest stored level, as the
        native kernels compute them from plane bytes; None when the native kernels do not serve it."""
        from moestream.convert.nested_planes import planes_from_encoded, unpack_header
        from moestream.engine import native_kernels
        from moestream.engine.streaming import expert_layout, nested_plane_decoder

        codec_name = expert_layout(reader).codec
        if not native_kernels.serves(codec_name, "cpu"):
            return None
        dec = nested_plane_decoder(reader)
        level = max(reader.n_levels(layer, expert) for layer, expert in reader.expert_keys()) - 1
        group_size = unpack_header(dec.header)[3]
        scale_dtype = np.float16 if getattr(dec.codec, "scale_dtype", "f16") == "f16" else np.float32
        rng = np.random.default_rng(0)
        makers = native_kernels.NestedViews()
        views = []
        for _ in range(top_k):
            enc = {p: native_kernels.random_encoded(dec.codec, *dec.shapes[p], dec.layout.group_sizes[p], rng,
                                                    scale_dtype) for p in dec.shapes}
            blobs = [b.view(np.uint8) for b in planes_from_encoded(dec.codec, group_size, dec.shapes, enc)]
            views.append(makers.view(blobs[:level + 1], level))
        return cls(views, f"native {codec_name} level {level}")

    def hint(self, *a: Any) -> None:
        pass

    def acquire(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float]) -> dict:
        return {int(e): self.views[i % len(self.views)] for i, e in enumerate(expert_ids)}

    def release(self, layer: int, expert_ids: Sequence[int]) -> None:
        pass

    def stats(self) -> dict:
        return {}


def _quantize_like_stored(model: torch.nn.Module, targets: dict[str, str], prefix: str = "") -> dict[str, str]:
    """Replace the modules of ``targets`` (``quantized_targets``: those the loader keeps as Q8_0/Q4_0 blocks)
    under ``prefix`` by quantized copies of their current (random) weights, so timing runs the same kernels;
    returns the ``{module: kind}`` replaced."""
    from moestream.engine import dense_kernels
    from moestream.engine.quantized_dense import QuantizedEmbedding, QuantizedLinear

    targets = {n: k for n, k in targets.items() if n.startswith(prefix)}
    for name, kind in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if old.weight.is_meta:
            continue  # not materialised (a layer that is not timed)
        packed = dense_kernels.quantize(old.weight.detach(), kind)
        new = QuantizedEmbedding(packed) if isinstance(old, torch.nn.Embedding) else \
            QuantizedLinear(packed, getattr(old, "bias", None))
        setattr(parent, child, new)
    return targets


def measure_decode_compute(model_type: str, config: dict, steps: int = 16,
                           full_model_limit: int = 512 * 2**20, reader: Any = None) -> dict:
    """Seconds of compute one decode token takes with every expert resident — measured, not modelled.

    Builds the real family with random weights and k random resident experts
    and times decode steps through the KV cache (embedding, every layer, LM
    head, the loop's own overheads). When the dense weights exceed
    ``full_model_limit`` only ONE decoder layer is built and timed, scaled by
    the layer count, and the LM head is added at the measured memory bandwidth.

    With ``reader`` (an opened shard model) the timed weights are held the way
    the engine holds that model's: dense matrices stored as Q8_0/Q4_0 run on the
    block kernels, nested experts on the native kernels at their highest stored
    level (random codes of the stored codec); fp32 otherwise.

    Returns:
        ``{"method", "compute_s_per_token", "experts", "quantized_dense", ...}``.
    """
    from moestream.engine.hf_loading import build_model

    with torch.device("meta"):
        meta, args = build_model(model_type, config, torch.float32)
    targets = quantized_targets(meta, reader, "cpu") if reader is not None else {}  # {module: q8_0|q4_0}
    dense = meta.costs(bytes_per_param=FP32_BYTES).dense_bytes
    gen = torch.Generator().manual_seed(0)
    provider = (_RandomExperts.like_stored(reader, args.top_k) if reader is not None else None) or \
        _RandomExperts.fp32(args.hidden_size, args.expert_intermediate_size, args.top_k)

    def randomise(module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen) if "norm" in name
                        else 0.05 * torch.randn(p.shape, generator=gen))

    if dense <= full_model_limit:
        model, _ = build_model(model_type, config, torch.float32)
        randomise(model)
        quantized = _quantize_like_stored(model, targets)
        model.set_expert_provider(provider)
        cache = model.make_cache(1, 64 + steps + 2)
        tok = torch.zeros(1, 1, dtype=torch.long)
        times = []
        with torch.no_grad():
            model(torch.zeros(1, 32, dtype=torch.long), cache)
            for _ in range(steps + 2):
                t0 = time.perf_counter()
                logits = model(tok, cache)[0, -1]
                tok = logits.argmax().view(1, 1)
                times.append(time.perf_counter() - t0)
        return {"method": "full model, random weights, decode steps", "dense_bytes": dense,
                "experts": provider.kind, "quantized_dense": len(quantized),
                "compute_s_per_token": float(np.median(times[2:]))}
    moe = meta.moe_layers()
    layer_idx = moe[0] if moe else 0
    layer = meta.model.layers[layer_idx]
    layer.to_empty(device="cpu")
    randomise(layer)
    quantized = _quantize_like_stored(meta, targets, f"model.layers.{layer_idx}.")
    layer = meta.model.layers[layer_idx]
    meta.set_expert_provider(provider)
    with torch.device("cpu"):
        rope = meta.build_rope()  # the family's own RoPE tables, on CPU
    entry = layer.self_attn.new_cache_entry(1, 64 + steps, torch.float32, "cpu")
    x = torch.randn(1, 1, args.hidden_size, generator=gen)
    times = []
    with torch.no_grad():
        for t in range(steps + 2):
            cos, sin = rope(32 + t, 1)
            t0 = time.perf_counter()
            layer(x, cos, sin, 32 + t, entry)
            times.append(time.perf_counter() - t0)
    layer_s = float(np.median(times[2:]))
    head_kind = targets.get("lm_head")
    head_bytes = (packed_nbytes(head_kind, (int(args.vocab_size), int(args.hidden_size))) if head_kind
                  else args.vocab_size * args.hidden_size * FP32_BYTES)
    head = 2 * head_bytes / measure_memory_bandwidth()
    return {"method": "one decoder layer timed x layers + LM head at memory bandwidth", "dense_bytes": dense,
            "experts": provider.kind, "quantized_dense": len(quantized), "layer_s": layer_s, "lm_head_s": head,
            "compute_s_per_token": layer_s * int(args.num_hidden_layers) + head}


FP32_BYTES = 4


def measure_memory_bandwidth(nbytes: int = 64 * 2**20) -> float:
    """Bytes/s of a large fp32 reduction (what a decode step's matmuls are bound by)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        x.sum()
    return 3 * nbytes / (time.perf_counter() - t0)


def find_analysis_report(model: str, explicit: str | None = None) -> Path | None:
    """The ``analyze`` report to use: ``explicit``, ``MODEL/analysis/report.json``, or the default model's."""
    candidates = [Path(explicit)] if explicit else []
    path = Path(model)
    if path.is_dir():
        candidates += [path / "analysis" / "report.json", path / "report.json"]
    if model == "default":
        candidates.append(DEFAULT_MODEL_REPORT)
    for c in candidates:
        if c.is_dir():
            c = c / "report.json"
        if c.is_file():
            return c
    return None


def expected_hit_rate(report_path: Path | None, rho: float, policy: str, arena_fraction: float) -> dict:
    """Hit rate of ``policy`` for a model-level cache of ``rho`` x active experts.

    Interpolates the report's model-level curve (observed); without a report,
    the no-locality estimate: the share of all experts the arena holds.
    """
    if arena_fraction >= 1.0:
        return {"hit_rate": 1.0, "source": "every expert fits the arena (cold misses only)"}
    if report_path is not None:
        rep = json.loads(report_path.read_text())
        curves = rep.get("hit_rate", {}).get("model") or rep.get("hit_rate", {}).get("layer") or {}
        name = policy if policy in curves else next(iter(curves), None)
        if name is not None:
            rhos = rep["settings"]["rhos"]
            ys = curves[name]["observed"]
            return {"hit_rate": float(np.interp(rho, rhos, ys)), "policy": name,
                    "source": f"{report_path} (model-level {name} curve at rho={rho:.2f})"}
    return {"hit_rate": float(arena_fraction), "source": "no analyze report: no-locality estimate "
            "(share of all experts the arena holds); run `moestream analyze MODEL --text FILE --out DIR`"}


def doctor(model: str, memory: str | int | None = None, ctx: int | None = None, cache_policy: str = "lru",
           analysis: str | None = None, measure: bool = True) -> dict:
    """Plan a run without loading weights and predict its decode speed.

    Args:
        model: shard folder/file, HF folder, or ``default``.
        memory: the budget (default: a safe fraction of available RAM).
        ctx: context length.
        cache_policy: whose hit-rate curve to use.
        analysis: an ``analyze`` report (file or folder) to take the hit rate from.
        measure: read the shard to measure disk bandwidth (False: skip, no speed prediction).

    Returns:
        A JSON-ready dict (``fits``, ``budget_bytes``, ``min_budget_bytes``, ``plan``, ``disk``,
        ``expert_bytes_per_token``, ``expected_hit``, ``predicted_decode_tok_s``, ...).

    Raises:
        ModelFormatError / UnsupportedModelError: the model cannot be opened.
    """
    from moestream.engine.api import DEFAULT_CTX, resolve_model_path
    from moestream.engine.planning import (all_experts_arena_bytes, min_streaming_budget, model_footprint,
                                           plan_for, resident_requirement, resolve_budget)
    from moestream.engine.streaming import default_ctx, shard_footprint

    src = resolve_model_path(model)
    budget = resolve_budget(memory)
    out: dict[str, Any] = {"model": str(src.path), "format": src.kind, "budget_bytes": budget,
                           "budget_source": "--memory" if memory is not None else "default (80% of available RAM)"}
    if src.kind == "hf":
        config = json.loads((src.path / "config.json").read_text())
        ctx_ = default_ctx(config, ctx, DEFAULT_CTX)
        fp = model_footprint(config.get("model_type", ""), config, [1], ctx_)
        need = resident_requirement(fp)
        out.update(ctx=ctx_, fits=budget >= need, min_budget_bytes=need, footprint=fp.as_dict(),
                   note="HF folders load fully resident; convert to stream experts under a smaller budget",
                   plan={"resident_bytes": fp.resident_bytes + fp.expert_compute_bytes * fp.total_routed_experts,
                         "kv_bytes": fp.kv_bytes,
                         "workspace_bytes": fp.activation_bytes + fp.runtime_bytes})
        if measure:
            compute = measure_decode_compute(config.get("model_type", ""), config)
            out.update(compute=compute, predicted_decode_tok_s=1.0 / compute["compute_s_per_token"])
        return out
    from moestream.convert.shard_reader import ShardedModel

    with ShardedModel.open(src.path, verify="off") as reader:
        reader_type, reader_config = reader.model_type, reader.config
        ctx_ = default_ctx(reader.config, ctx, DEFAULT_CTX)
        fp = shard_footprint(reader, ctx_)
        minimum = min_streaming_budget(fp)
        out.update(ctx=ctx_, min_budget_bytes=minimum, footprint=fp.as_dict(),
                   all_experts_budget_bytes=fp.resident_bytes + fp.kv_bytes + fp.workspace_bytes
                   + fp.io_buffer_bytes + all_experts_arena_bytes(fp),
                   expert_bytes_per_token=fp.expert_bytes_per_token)
        try:
            plan = plan_for(fp, budget)
        except BudgetError as exc:
            out.update(fits=False, refusal=str(exc))
            return out
        slot = plan.slot_bytes(0)
        slots = min((plan.arena_bytes - plan.alignment) // slot, fp.total_routed_experts)
        rho = slots / fp.active_experts_per_token
        fraction = slots / fp.total_routed_experts
        report = find_analysis_report(model, analysis)
        hit = expected_hit_rate(report, rho, cache_policy, fraction)
        out.update(fits=True, plan=plan.as_dict(), arena_slots=slots, cache_rho=rho, arena_fraction=fraction,
                   expected_hit=hit)
        if not measure:
            return out
        disk = measure_disk_bandwidth(reader)
        compute = measure_decode_compute(reader_type, reader_config, reader=reader)
    miss_bytes = fp.expert_bytes_per_token * (1.0 - hit["hit_rate"])
    t_io = miss_bytes / disk["bandwidth_bytes_per_s"] if disk["bandwidth_bytes_per_s"] > 0 else float("inf")
    t_compute = compute["compute_s_per_token"]
    out.update(disk=disk, compute=compute, miss_bytes_per_token=miss_bytes,
               io_s_per_token=t_io, compute_s_per_token=t_compute,
               predicted_decode_tok_s=1.0 / (t_io + t_compute),
               predicted_decode_tok_s_full_overlap=1.0 / max(t_io, t_compute),
               prediction_model="tok/s = 1 / (expected miss bytes per token / measured expert-read bandwidth + "
                                "measured resident decode compute per token); reads and compute not overlapped")
    return out


def format_doctor(d: dict) -> str:
    """Human-readable doctor report."""
    fb = format_bytes
    lines = [f"model:   {d['model']} ({d['format']}), context {d['ctx']}",
             f"budget:  {fb(d['budget_bytes'])} ({d['budget_source']})",
             f"minimum: {fb(d['min_budget_bytes'])} ({d['min_budget_bytes']} bytes)",
             f"fits:    {'yes' if d['fits'] else 'NO'}"]
    if d.get("refusal"):
        lines.append(f"  {d['refusal']}")
    fp = d.get("footprint", {})
    if d["format"] == "shards" and d.get("plan"):
        p = d["plan"]
        lines += [f"split:   resident {fb(p['resident_bytes'])} | KV {fb(p['kv_bytes'])} | workspace "
                  f"{fb(p['workspace_bytes'])} (runtime reserve {fb(fp['runtime_bytes'])}) | I/O "
                  f"{fb(p['io_buffer_bytes'])} | expert cache {fb(p['arena_bytes'])}",
                  f"cache:   {d['arena_slots']} expert slots = rho {d['cache_rho']:.2f} x active experts, "
                  f"{100 * d['arena_fraction']:.1f}% of all experts "
                  f"(everything fits from {fb(d['all_experts_budget_bytes'])})",
                  f"experts: {fb(d['expert_bytes_per_token'])} per token; expected hit rate "
                  f"{100 * d['expected_hit']['hit_rate']:.1f}% — {d['expected_hit']['source']}"]
    if "disk" in d:
        disk = d["disk"]
        lines += [f"disk:    {disk['bandwidth_bytes_per_s'] / 1e6:.0f} MB/s ({disk['reads']} reads of "
                  f"{fb(disk['read_size'])}, {disk['direct_reads']} O_DIRECT)",
                  f"decode:  predicted {d['predicted_decode_tok_s']:.1f} tok/s (up to "
                  f"{d['predicted_decode_tok_s_full_overlap']:.1f} with reads fully overlapped); "
                  f"{1e3 * d['io_s_per_token']:.2f} ms I/O + {1e3 * d['compute_s_per_token']:.2f} ms compute per token"]
    elif "predicted_decode_tok_s" in d:
        lines.append(f"decode:  predicted {d['predicted_decode_tok_s']:.1f} tok/s (measured resident compute)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- analyze
class HintRecorder:
    """Wraps an expert provider to record the prefetch hints the MoE blocks issue (forwards everything)."""

    wants_hints = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.hints: dict[int, list[np.ndarray]] = {}
        self.max_experts_per_acquire = getattr(inner, "max_experts_per_acquire", None)

    def hint(self, layer: int, predicted_ids: torch.Tensor, predicted_weights: torch.Tensor) -> None:
        self.hints.setdefault(layer, []).append(predicted_ids.detach().cpu().numpy().astype(np.int64))
        if getattr(self.inner, "wants_hints", False):
            self.inner.hint(layer, predicted_ids, predicted_weights)

    def acquire(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float]) -> dict:
        return self.inner.acquire(layer, expert_ids, gate_weights)

    def release(self, layer: int, expert_ids: Sequence[int]) -> None:
        self.inner.release(layer, expert_ids)

    def stats(self) -> dict:
        return self.inner.stats()


def _windows(ids: list[int], window: int, max_windows: int | None) -> list[list[int]]:
    out = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    out = [w for w in out if len(w) >= 2]
    return out[:max_windows] if max_windows else out


def record_routing(engine: Any, texts: Sequence[tuple[str, str]], window: int = 256,
                   max_windows: int | None = None) -> tuple[Any, dict]:
    """Teacher-forced routing traces of ``texts`` (one sequence per window) and hint accuracy.

    Args:
        engine: a loaded :class:`~moestream.engine.api.Engine`.
        texts: ``(name, text)`` pairs.
        window: tokens per sequence.
        max_windows: cap on sequences per text.

    Returns:
        ``(RoutingTrace, prefetch)`` where ``prefetch`` has per-layer and mean per-token recall of the
        next-layer hint (fraction of a token's k experts that were predicted) and top-1 recall.
    """
    from moestream.scheduler.simulate import TraceRecorder

    model = engine.model
    moe = model.moe_layers()
    index = {layer: i for i, layer in enumerate(moe)}
    first = model.model.layers[moe[0]].mlp
    blocks = [model.model.layers[i].mlp for i in moe]
    if len({b.top_k for b in blocks}) > 1:
        raise NotImplementedError("routing traces hold one top-k for every MoE layer; this model was converted "
                                  "with a per-layer --top-k (moestream_top_k_per_layer)")
    rec = TraceRecorder(len(moe), max(b.num_experts for b in blocks), first.top_k)  # ids < the largest count
    actual: dict[int, list[np.ndarray]] = {}

    def hook(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        rec(index[layer], ids, weights)
        actual.setdefault(layer, []).append(ids.detach().cpu().numpy().astype(np.int64))

    inner = model.expert_provider
    hints = HintRecorder(inner)
    model.set_expert_provider(hints)
    model.add_routing_hook(hook)
    n_tokens = 0
    try:
        with torch.no_grad():
            for name, text in texts:
                ids = engine.tokenizer.encode(text, add_special_tokens=False)
                for w in _windows(ids, window, max_windows):
                    rec.begin_sequence()
                    model(torch.tensor([w], dtype=torch.long), None)
                    rec.end_sequence()
                    n_tokens += len(w)
                log.info("recorded %s: %d tokens so far", name, n_tokens)
    finally:
        model.remove_routing_hook(hook)
        model.set_expert_provider(inner)
    per_layer = {}
    for layer in moe[1:]:
        pred = np.concatenate(hints.hints.get(layer, [np.zeros((0, first.top_k), np.int64)]))
        act = np.concatenate(actual[layer])
        if len(pred) != len(act):
            continue
        overlap = (pred[:, :, None] == act[:, None, :]).any(axis=1)  # [T, k] actual expert j was predicted
        per_layer[str(layer)] = {"recall": float(overlap.mean()), "top1_recall": float(overlap[:, 0].mean()),
                                 "tokens": int(len(act))}
    recalls = [v["recall"] for v in per_layer.values()]
    prefetch = {"method": "per token: share of layer l+1's routed experts that the engine's hint (layer l+1's "
                          "pre-MoE norm and router applied to layer l's output hidden state) predicted; "
                          "top1 = the highest-weight routed expert",
                "per_layer": per_layer, "mean_recall": float(np.mean(recalls)) if recalls else None,
                "mean_top1_recall": float(np.mean([v["top1_recall"] for v in per_layer.values()]))
                if per_layer else None}
    trace = rec.trace({"model": engine.name, "texts": [n for n, _ in texts], "window": window,
                       "moe_layers": moe})
    return trace, prefetch


def analyze_model(model: str, text_files: Sequence[str], out_dir: str | None, *, window: int = 256,
                  max_windows: int | None = None, memory: str | None = None, rhos: Sequence[int] | None = None,
                  segment_lengths: Sequence[int] | None = None, sch_m: int = 16, window_tokens: int = 4,
                  policies: Sequence[str] | None = None, scopes: Sequence[str] = ("layer", "model"),
                  seed: int = 0, plot: bool = True) -> dict:
    """Record traces of the text files through the model, then the routing-consistency report.

    Returns:
        The report (``scheduler.analysis.analyze``) with ``prefetch`` added; written to ``out_dir``
        (``report.json``, ``hit_rate.png``, ``trace.npz``) when given.

    Raises:
        ModelFormatError: a text file is missing.
    """
    from moestream.engine.api import Engine
    from moestream.scheduler.analysis import DEFAULT_POLICIES, DEFAULT_SEGMENT_LENGTHS, analyze, save_report

    texts = []
    for f in text_files:
        p = Path(f)
        if not p.is_file():
            raise ModelFormatError(f"--text {f}: no such file")
        texts.append((p.name, p.read_text(errors="replace")))
    with Engine.load(model, memory=memory, device="cpu") as engine:
        trace, prefetch = record_routing(engine, texts, window, max_windows)
    report = analyze(trace, segment_lengths=segment_lengths or DEFAULT_SEGMENT_LENGTHS, sch_m=sch_m, rhos=rhos,
                     policies=policies or DEFAULT_POLICIES, scopes=scopes, window_tokens=window_tokens,
                     shuffle_seed=seed)
    report["prefetch"] = prefetch
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        trace.save(Path(out_dir) / "trace.npz")
        save_report(report, out_dir, plot=plot)
    return report


# ------------------------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``doctor`` and ``analyze`` to the ``moestream`` CLI."""
    from moestream.scheduler.commands import add_analysis_options

    p = subparsers.add_parser("doctor", help="will MODEL fit --memory, and how fast will it decode?",
                              description="Plan MODEL under the budget without loading weights: fits or not, "
                                          "the minimum budget, the split resident/KV/cache, measured disk "
                                          "bandwidth and the predicted decode speed.")
    p.add_argument("model", help="moestream shard folder/.gguf, HF folder, or 'default'")
    p.add_argument("--memory", metavar="SIZE", help="budget, e.g. 6GB, 512MiB, 75%% (default: 80%% of available)")
    p.add_argument("--ctx", type=int, metavar="N", help="context length (KV cache size)")
    p.add_argument("--cache-policy", choices=("lru", "lfu", "consistency"), default="lru")
    p.add_argument("--analysis", metavar="PATH", help="analyze report (report.json or its folder) for the hit rate")
    p.add_argument("--no-measure", action="store_true", help="skip the disk/memory bandwidth measurement")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_doctor)

    a = subparsers.add_parser("analyze", help="routing-consistency report (SRP, cache hit rates, prefetch accuracy)",
                              description="MODEL --text FILE: record routing traces of the text through the model "
                                          "(teacher-forced windows) and report SRP, hit-rate curves of LRU/LFU/"
                                          "consistency/SCH/Belady with time-shuffled baselines, and the accuracy "
                                          "of the next-layer prefetch hint. TRACE.npz: analyse a recorded trace.")
    a.add_argument("source", help="model (folder, .gguf, 'default') or a routing trace .npz")
    a.add_argument("--text", nargs="+", metavar="FILE", help="text file(s) to record (needed for a model)")
    a.add_argument("--out", help="folder for report.json, hit_rate.png (and trace.npz)")
    a.add_argument("--window", type=int, default=256, help="tokens per recorded sequence (default 256)")
    a.add_argument("--max-windows", type=int, help="at most this many sequences per text file")
    a.add_argument("--memory", metavar="SIZE", help="budget for loading the model")
    add_analysis_options(a)
    a.set_defaults(func=cmd_analyze)


def cmd_doctor(args: argparse.Namespace) -> int:
    """``moestream doctor``: prints the report; exit 0 when the model fits, 1 when it does not."""
    d = doctor(args.model, memory=args.memory, ctx=args.ctx, cache_policy=args.cache_policy,
               analysis=args.analysis, measure=not args.no_measure)
    print(json.dumps(d, default=float) if args.json else format_doctor(d))
    return 0 if d["fits"] else 1


def cmd_analyze(args: argparse.Namespace) -> int:
    """``moestream analyze``: a trace file (as the scheduler's command) or a model plus text."""
    if args.source.endswith(".npz"):
        from moestream.scheduler.commands import run_analyze

        args.trace = args.source
        return run_analyze(args)
    if not args.text:
        raise MoestreamError("analyze MODEL needs --text FILE (or pass a routing trace .npz)")
    from moestream.scheduler.analysis import format_report

    report = analyze_model(args.source, args.text, args.out, window=args.window, max_windows=args.max_windows,
                           memory=args.memory, rhos=args.rho, segment_lengths=args.segment_lengths,
                           sch_m=args.sch_m, window_tokens=args.window_tokens, policies=args.policies,
                           scopes=args.scope, seed=args.seed, plot=not args.no_plot)
    sys.stdout.write(format_report(report) + "\n")
    pf = report["prefetch"]
    if pf["mean_recall"] is not None:
        sys.stdout.write(f"prefetch hint: {100 * pf['mean_recall']:.1f}% of routed experts predicted "
                         f"(top-1 {100 * pf['mean_top1_recall']:.1f}%)\n")
    if args.out:
        sys.stdout.write(f"wrote {args.out}/report.json\n")
    return 0
