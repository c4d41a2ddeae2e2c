"""Expert pruning: which routed experts to keep, and the config of the pruned model.

Owns (spec: /work/shared/specs/compression.md, "Pruning mechanics"):

- :func:`choose_kept` — drop the lowest-scoring experts. ``uniform``: the
  same count per layer (what llama.cpp export needs); ``adaptive``: per-layer
  counts from one global threshold on scores normalised by each layer's
  mean (a layer already at its floor is skipped and the next-lowest expert
  elsewhere goes instead, so the total dropped is what ``ratio`` asks). Every
  layer keeps at least ``top_k`` experts. DeepSeek grouped routing
  (``n_group > 1``): the same number is dropped in every contiguous group so
  group membership stays valid, and each group keeps enough experts for
  ``topk_group`` groups to supply ``top_k`` (and ``min_per_group``: 2 for
  ``noaux_tc``, which ranks groups by their top-2). In adaptive mode each
  layer's count is rounded to the nearest multiple of ``n_group`` first.
- :func:`pruned_config` — the HF config of the pruned model (expert count,
  optional new top-k, one value or one per MoE layer). Router rows and router
  biases are sliced with the same kept indices by the converter
  (``plan_conversion(kept=...)``).

Per-layer config keys (read by every engine family, ``engine/models/base.py``):
when layers keep different counts, ``moestream_num_experts_per_layer`` lists
the routed experts of every decoder layer (0 for dense layers) and the usual
count key (``num_experts`` / ``num_local_experts`` / ``n_routed_experts``)
holds the largest; a per-layer ``--top-k`` is recorded the same way as
``moestream_top_k_per_layer`` with ``num_experts_per_tok`` = the largest.
Uniform values write neither key (the config stays a plain HF config).

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
from typing import Any, Mapping, Sequence

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
                n_group: int = 1, topk_group: int = 1, min_per_group: int = 1) -> dict[int, list[int]]:
    """Kept expert ids per layer (ascending, i.e. original order) after dropping ``ratio`` of them.

    Args:
        scores: layer -> ``[E]`` importance (higher = keep).
        ratio: fraction of experts to drop (per layer in ``uniform`` mode, over all layers in ``adaptive``),
            ``0 <= ratio < 1``.
        mode: ``uniform`` or ``adaptive``.
        top_k: experts per token (each layer keeps at least this many).
        n_group / topk_group: DeepSeek grouped routing.
        min_per_group: experts each group must keep (2 for ``noaux_tc``).

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
    if mode == "uniform":
        counts = {layer: len(s) - int(round(ratio * len(s))) for layer, s in scores.items()}
    elif n_group > 1:
        per_min = max(-(-top_k // topk_group), min_per_group, 1)
        counts = _adaptive_counts(scores, ratio, n_group * per_min,
                                  f"top-k={top_k} with {n_group} routing groups ({per_min} per group)")
        counts = {layer: max(n_group * per_min, n_group * int(round(c / n_group))) for layer, c in counts.items()}
    else:
        counts = _adaptive_counts(scores, ratio, top_k, f"top-k={top_k}")
    kept = {}
    for layer, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        E = len(s)
        if n_group > 1:
            kept[layer] = _grouped_keep(s, counts[layer], n_group, topk_group, top_k, layer, min_per_group)
            continue
        k = min(max(counts[layer], top_k), E)
        if mode == "uniform" and E - int(round(ratio * E)) < top_k:
            raise ValueError(f"pruning {ratio:.0%} of layer {layer}'s {E} experts leaves fewer than top-k={top_k}; "
                             "lower --prune")
        order = np.lexsort((np.arange(E), -s))  # best first; ties: lower id first
        kept[layer] = sorted(order[:k].tolist())
    return kept


def _adaptive_counts(scores: Mapping[int, np.ndarray], ratio: float, floor: int = 1,
                     why: str = "top-k") -> dict[int, int]:
    """Per-layer keep counts: one global threshold on scores / layer mean, no layer below ``floor``.

    Raises:
        ValueError: ``ratio`` of all experts cannot be dropped with every layer keeping ``floor``.
    """
    items = []
    for layer, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        m = s.mean() if s.mean() > 0 else 1.0
        items += [(v / m, layer) for v in s]
    total = len(items)
    n_drop = int(round(ratio * total))
    if total - n_drop < floor * len(scores):
        raise ValueError(f"adaptive pruning of {ratio:.0%} leaves {total - n_drop} experts for {len(scores)} layers, "
                         f"fewer than the {floor} per layer that {why} needs; lower --prune")
    items.sort(key=lambda t: t[0])  # stable: ties keep layer order, then expert order
    counts = {layer: len(s) for layer, s in scores.items()}
    dropped = 0
    for _, layer in items:
        if dropped == n_drop:
            break
        if counts[layer] > floor:
            counts[layer] -= 1
            dropped += 1
    return counts


def _grouped_keep(s: np.ndarray, keep: int, n_group: int, topk_group: int, top_k: int, layer: int,
                  min_per_group: int = 1) -> list[int]:
    E = len(s)
    if E % n_group:
        raise ValueError(f"layer {layer}: {E} experts do not split into {n_group} groups")
    per = E // n_group
    keep_per = min(max(int(math.floor(keep / n_group)), 1), per)
    if keep_per * topk_group < top_k:
        raise ValueError(f"layer {layer}: keeping {keep_per} experts per group leaves {topk_group} groups with fewer "
                         f"than top-k={top_k} experts; lower --prune")
    if keep_per < min_per_group:
        raise ValueError(f"layer {layer}: keeping {keep_per} experts per group, but this routing needs at least "
                         f"{min_per_group} per group; lower --prune")
    kept = []
    for g in range(n_group):
        sg = s[g * per:(g + 1) * per]
        order = np.lexsort((np.arange(per), -sg))
        kept += [g * per + int(i) for i in sorted(order[:keep_per].tolist())]
    return kept


def parse_top_k(text: str | int | Sequence[int] | None) -> int | list[int] | None:
    """``--top-k``: ``"6"`` (every MoE layer) or ``"8,8,6,6"`` (one value per MoE layer, in layer order).

    Raises:
        ValueError: not a positive integer or a comma-separated list of them.
    """
    if text is None or isinstance(text, int):
        return text
    if not isinstance(text, str):
        return [int(v) for v in text]
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--top-k {text!r}: give one integer (every MoE layer) or one per MoE layer, "
                         "comma-separated (e.g. 8,8,6,6)")
    vals = [int(p) for p in parts]
    return vals[0] if len(vals) == 1 else vals


def pruned_config(config: Mapping[str, Any], kept: Mapping[int, list[int]], top_k: int | Sequence[int] | None = None,
                  moe_layers: Sequence[int] | None = None) -> dict[str, Any]:
    """The HF config of the pruned model.

    Args:
        config: the original config.
        kept: layer -> kept ids (every MoE layer; empty when not pruning).
        top_k: new experts-per-token (activation adjustment): one value, one per MoE layer
            (in ``moe_layers`` order), or None to keep it.
        moe_layers: the MoE decoder layers (default: the layers of ``kept``); needed for a per-layer
            ``top_k`` without pruning.

    Returns:
        A new config dict: expert count (the largest, plus ``moestream_num_experts_per_layer`` when
        layers differ), ``num_experts_per_tok`` (the largest, plus ``moestream_top_k_per_layer`` when
        layers differ); DeepSeek group sizes stay valid.

    Raises:
        ValueError: a top-k outside 1..(that layer's kept experts), too few experts in the routing
            groups a token may use, or a per-layer list whose length is not the number of MoE layers.
    """
    cfg = dict(config)
    layers = sorted(int(v) for v in (moe_layers if moe_layers is not None else kept))
    n_layers = int(cfg.get("num_hidden_layers") or (max(layers) + 1 if layers else 0))
    per_cfg = cfg.get("moestream_num_experts_per_layer")
    base = expert_count(cfg) if any(isinstance(cfg.get(k), int) for k in EXPERT_COUNT_KEYS) else 0
    counts = {layer: (len(kept[layer]) if layer in kept else int(per_cfg[layer]) if per_cfg else base)
              for layer in layers}
    if kept:
        distinct = set(counts.values())
        n = max(distinct)
        for k in EXPERT_COUNT_KEYS:
            if k in cfg and isinstance(cfg[k], int):
                cfg[k] = n
        if len(distinct) > 1:
            cfg["moestream_num_experts_per_layer"] = [counts.get(i, 0) for i in range(n_layers)]
        else:
            cfg.pop("moestream_num_experts_per_layer", None)
    old_k = int(cfg.get("num_experts_per_tok") or 1)
    ks = _per_layer_top_k(top_k, layers, old_k, cfg)
    n_group, topk_group = routing_groups(cfg)
    for layer in layers:
        k, n = ks[layer], counts[layer]
        if not 1 <= k <= n:
            which = "--top-k" if top_k is not None else "top-k (num_experts_per_tok)"
            raise ValueError(f"{which} {k} for MoE layer {layer} must be in 1..{n} (the experts it keeps)")
        if n_group > 1 and n % n_group == 0 and k > topk_group * (n // n_group):
            raise ValueError(f"top-k {k} for MoE layer {layer} exceeds the {topk_group} x {n // n_group} experts of "
                             f"the {topk_group} routing groups a token may use; lower --top-k or --prune")
    if top_k is not None:
        distinct_k = set(ks.values()) or {old_k}
        cfg["num_experts_per_tok"] = max(distinct_k)
        if len(distinct_k) > 1:
            cfg["moestream_top_k_per_layer"] = [ks.get(i, 0) for i in range(n_layers)]
        else:
            cfg.pop("moestream_top_k_per_layer", None)
    return cfg


def _per_layer_top_k(top_k: int | Sequence[int] | None, layers: list[int], old_k: int,
                     cfg: Mapping[str, Any]) -> dict[int, int]:
    """MoE layer -> top-k from the option (or the config's current values)."""
    if top_k is None:
        per = cfg.get("moestream_top_k_per_layer")
        return {layer: int(per[layer]) if per else old_k for layer in layers}
    if isinstance(top_k, int):
        if top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {top_k}")
        return {layer: int(top_k) for layer in layers}
    vals = [int(v) for v in top_k]
    if len(vals) != len(layers):
        raise ValueError(f"--top-k lists {len(vals)} values, the model has {len(layers)} MoE layers "
                         f"({', '.join(map(str, layers))}): give one value, or one per MoE layer")
    if any(v < 1 for v in vals):
        raise ValueError(f"--top-k values must be >= 1, got {vals}")
    return dict(zip(layers, vals))
