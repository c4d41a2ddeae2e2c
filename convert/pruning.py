"""Expert pruning: which routed experts to keep, and the config of the pruned model.

Owns (spec: /work/shared/specs/compression.md, "Pruning mechanics"):

- :func:`choose_kept` — drop the lowest-scoring experts. ``uniform``: the
  same count per layer (what llama.cpp export needs); ``adaptive``: per-layer
  counts from one global threshold on scores normalised by each layer's
  mean. Every layer keeps at least ``top_k`` experts. DeepSeek grouped routing
  (``n_group > 1``): the same number is dropped in every contiguous group so
  group membership stays valid, and each group keeps enough experts for
  ``topk_group`` groups to supply ``top_k``.
- :func:`pruned_config` — the HF config of the pruned model (expert count,
  optional new top-k). Router rows and router biases are sliced with the same
  kept indices by the converter (``plan_conversion(kept=...)``).

Routing after pruning: the router's softmax runs over the kept experts only.
Qwen3-MoE / Mixtral / DeepSeek renormalise the top-k weights, so a token
whose top-k experts all survive is routed exactly as before. Qwen2-MoE and
OLMoE do *not* renormalise (``norm_topk_prob: false``): their kept weights are
the softmax over the kept set, i.e. scaled up by 1/(1 − removed probability
mass). That is inherent to slicing router rows (no bias can restore the
original scale) and shows in the quality report; it is recorded in the
compression metadata.

Knows nothing about files, codecs or the engine.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

PRUNE_MODES = ("uniform", "adaptive")
#: config spellings of the routed-expert count (Qwen, Mixtral/our canonical, DeepSeek)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def expert_count(config: Mapping[str, Any]) -> int:
    """Routed experts per layer from an HF config.

    Raises:
        ValueError: the config names no expert count.
    """
    for k in EXPERT_COUNT_KEYS:
        if isinstance(config.get(k), int) and config[k] > 0:
            return int(config[k])
    raise ValueError(f"config has none of {EXPERT_COUNT_KEYS}; is this a MoE model?")


def routing_groups(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(n_group, topk_group)`` of DeepSeek grouped routing; ``(1, 1)`` for others."""
    n_group = int(config.get("n_group") or 1)
    topk_group = int(config.get("topk_group") or n_group)
    return max(n_group, 1), max(topk_group, 1)


def choose_kept(scores: Mapping[int, np.ndarray], ratio: float, mode: str = "uniform", top_k: int = 1,
                n_group: int = 1, topk_group: int = 1) -> dict[int, list[int]]:
    """Kept expert ids per layer (ascending, i.e. original order) after dropping ``ratio`` of them.

    Args:
        scores: layer -> ``[E]`` importance (higher = keep).
        ratio: fraction of experts to drop, ``0 <= ratio < 1``.
        mode: ``uniform`` or ``adaptive``.
        top_k: experts per token (each layer keeps at least this many).
        n_group / topk_group: DeepSeek grouped routing.

    Returns:
        layer -> kept ids (all ids when ``ratio`` is 0).

    Raises:
        ValueError: bad ratio or mode, a ratio that would leave fewer than ``top_k``
            experts, or grouped routing with a layer count not divisible into groups.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"--prune must be in [0, 1), got {ratio}")
    if mode not in PRUNE_MODES:
        raise ValueError(f"unknown --prune-mode {mode!r}; choose one of {', '.join(PRUNE_MODES)}")
    if ratio == 0:
        return {layer: list(range(len(s))) for layer, s in scores.items()}
    if mode == "uniform" or n_group > 1:
        counts = {layer: len(s) - int(round(ratio * len(s))) for layer, s in scores.items()}
    else:
        counts = _adaptive_counts(scores, ratio)
    kept = {}
    for layer, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        E = len(s)
        if n_group > 1:
            kept[layer] = _grouped_keep(s, counts[layer], n_group, topk_group, top_k, layer)
            continue
        k = max(counts[layer], top_k)
        if k > E:
            k = E
        if E - int(round(ratio * E)) < top_k:
            raise ValueError(f"pruning {ratio:.0%} of layer {layer}'s {E} experts leaves fewer than top-k={top_k}; "
                             "lower --prune")
        order = np.lexsort((np.arange(E), -s))  # best first; ties: lower id first
        kept[layer] = sorted(order[:k].tolist())
    return kept


def _adaptive_counts(scores: Mapping[int, np.ndarray], ratio: float) -> dict[int, int]:
    """Per-layer keep counts: one global threshold on scores / layer mean."""
    items = []
    for layer, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        m = s.mean() if s.mean() > 0 else 1.0
        items += [(v / m, layer) for v in s]
    total = len(items)
    n_drop = int(round(ratio * total))
    items.sort(key=lambda t: t[0])
    counts = {layer: len(s) for layer, s in scores.items()}
    for _, layer in items[:n_drop]:
        counts[layer] -= 1
    return counts


def _grouped_keep(s: np.ndarray, keep: int, n_group: int, topk_group: int, top_k: int, layer: int) -> list[int]:
    E = len(s)
    if E % n_group:
        raise ValueError(f"layer {layer}: {E} experts do not split into {n_group} groups")
    per = E // n_group
    keep_per = max(int(math.floor(keep / n_group)), 1)
    if keep_per * topk_group < top_k:
        raise ValueError(f"layer {layer}: keeping {keep_per} experts per group leaves {topk_group} groups with fewer "
                         f"than top-k={top_k} experts; lower --prune")
    kept = []
    for g in range(n_group):
        sg = s[g * per:(g + 1) * per]
        order = np.lexsort((np.arange(per), -sg))
        kept += [g * per + int(i) for i in sorted(order[:keep_per].tolist())]
    return kept


def pruned_config(config: Mapping[str, Any], kept: Mapping[int, list[int]], top_k: int | None = None) -> dict[str, Any]:
    """The HF config of the pruned model.

    Args:
        config: the original config.
        kept: layer -> kept ids (every MoE layer).
        top_k: new experts-per-token (activation adjustment), or None to keep it.

    Returns:
        A new config dict (expert count, ``num_experts_per_tok``; DeepSeek group sizes stay valid).

    Raises:
        NotImplementedError: layers keep different counts (adaptive mode): the engine's
            families read one expert count per model; use ``--prune-mode uniform``.
        ValueError: ``top_k`` larger than the kept experts.
    """
    counts = {len(v) for v in kept.values()}
    if len(counts) > 1:
        raise NotImplementedError(
            f"adaptive pruning kept {sorted(counts)} experts in different layers, but model configs (and the "
            "engine's families) have one expert count per model; use --prune-mode uniform")
    cfg = dict(config)
    if counts:
        n = counts.pop()
        for k in EXPERT_COUNT_KEYS:
            if k in cfg and isinstance(cfg[k], int):
                cfg[k] = n
        old_k = int(cfg.get("num_experts_per_tok") or 1)
        if (top_k or old_k) > n:
            raise ValueError(f"top-k {top_k or old_k} is larger than the {n} experts kept per layer")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {top_k}")
        cfg["num_experts_per_tok"] = int(top_k)
    return cfg
