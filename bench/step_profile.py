"""Where one decode step's time goes, by model component (wall clock of forward hooks).

Owns :func:`profile_components`: times every call of the modules that make up a decode step —
the attention projections (dense matrices), the attention core (RoPE, KV cache, SDPA: the
attention module minus its projections), the router, the routed experts (the MoE block minus its
router and shared expert), shared experts, the LM head, the embedding and norms — with
``time.perf_counter`` in forward pre/post hooks, and reports the remainder of the step
(Python between modules, sampling-free logits copy) as ``other``. Hook overhead (~1 µs per
module call) lands in the components it wraps; the step total is timed without hooks in the same
process, interleaved, so the table also says how much the hooks add.

Knows the engine's module layout (``engine/models/blocks.py``), nothing about files or engines.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Iterable

from torch import nn

#: Components in report order.
COMPONENTS = ("attention projections", "attention core", "router", "routed experts", "shared experts",
              "LM head", "embedding", "norms", "other")


def _classify(model: nn.Module) -> dict[nn.Module, str]:
    from moestream.engine.models.blocks import MoEBlock, RMSNorm

    out: dict[nn.Module, str] = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        out[attn] = "attention core"
        for name, child in attn.named_children():
            if name.endswith("_proj") or name.endswith("_a") or name.endswith("_b"):
                out[child] = "attention projections"
        mlp = layer.mlp
        if isinstance(mlp, MoEBlock):
            out[mlp] = "routed experts"
            out[mlp.gate] = "router"
            if mlp._shared_name is not None:
                out[getattr(mlp, mlp._shared_name)] = "shared experts"
            if mlp.shared_expert_gate is not None:
                out[mlp.shared_expert_gate] = "shared experts"
        else:
            out[mlp] = "shared experts"
    for m in model.modules():
        if isinstance(m, RMSNorm) and m not in out:
            out[m] = "norms"
    out[model.model.embed_tokens] = "embedding"
    if model.lm_head is not None:
        out[model.lm_head] = "LM head"
    return out


def profile_components(model: nn.Module, step: Callable[[int], object], tokens: Iterable[int],
                       reset: Callable[[], None] | None = None) -> dict:
    """Time ``step(tok)`` for each token with per-component hooks, and again without hooks (interleaved).

    Returns:
        ``{"steps": n, "step_ms": {"hooked": ms, "plain": ms}, "components_ms": {name: ms per step},
        "calls_per_step": {name: calls}}``; components are exclusive (a parent's time excludes its
        classified children), ``other`` = hooked step − Σ components.
    """
    kinds = _classify(model)
    stack: list[list] = []  # [module, kind, start, child_time]
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def pre(mod, _args):
        stack.append([mod, kinds[mod], time.perf_counter(), 0.0])

    def post(mod, _args, _out):
        m, kind, t0, child = stack.pop()
        dt = time.perf_counter() - t0
        total[kind] += dt - child
        calls[kind] += 1
        if stack:
            stack[-1][3] += dt

    tokens = list(tokens)
    hooked, plain = [], []
    for i, tok in enumerate(tokens):
        handles = []
        if i % 2 == 0:
            for mod in kinds:
                handles.append(mod.register_forward_pre_hook(pre))
                handles.append(mod.register_forward_hook(post))
        t0 = time.perf_counter()
        step(int(tok))
        dt = time.perf_counter() - t0
        for h in handles:
            h.remove()
        (hooked if i % 2 == 0 else plain).append(dt)
    n = len(hooked)
    comp = {k: 1e3 * total.get(k, 0.0) / n for k in COMPONENTS if k != "other"}
    step_ms = 1e3 * sum(hooked) / n
    comp["other"] = step_ms - sum(comp.values())
    return {"steps": n, "step_ms": {"hooked": step_ms, "plain": 1e3 * sum(plain) / max(1, len(plain))},
            "components_ms": comp, "calls_per_step": {k: calls.get(k, 0) / n for k in COMPONENTS if k != "other"}}


def format_table(res: dict) -> str:
    """A markdown table of :func:`profile_components`' result."""
    step = res["step_ms"]["hooked"]
    lines = [f"decode step: {step:.2f} ms with hooks, {res['step_ms']['plain']:.2f} ms without "
             f"(mean of {res['steps']} steps each, interleaved)", "",
             "| component | ms / step | share | calls / step |", "|---|---:|---:|---:|"]
    for k in COMPONENTS:
        ms = res["components_ms"][k]
        c = res["calls_per_step"].get(k, "")
        lines.append(f"| {k} | {ms:.2f} | {100 * ms / step:.0f}% | {c if c == '' else f'{c:.0f}'} |")
    return "\n".join(lines) + "\n"

