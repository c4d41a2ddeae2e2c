"""Routing traces and cache simulation on them: the file format and the simulators.

Owns the trace format (``RoutingTrace``, saved as ``.npz``), a recorder that
plugs into the engine's routing hook, time shuffling, and the cache
simulators used by the analysis: online policies (LRU, LFU, consistency),
Belady (MIN) and SCH(m) exactly as in the routing-consistency spec. Knows
nothing about models, files other than the trace, or the runtime arena.

Trace file (``.npz``, written by ``RoutingTrace.save``)::

    format          str   "moestream-routing-trace-v1"
    n_layers        int   L (MoE layers, in forward order)
    n_experts       int   E (routed experts per layer)
    top_k           int   k
    n_sequences     int   S
    ids_{s}         int16/int32 [L, T_s, k]  expert ids of sequence s, router order
    weights_{s}     float32 [L, T_s, k]      gate weights (optional, all or none)
    meta            str   JSON object (model name, text file, ...), optional

Hit-rate conventions (every simulator here): a token is one batch of
accesses; an access is a hit if the key is in the cache at the start of its
token; a first-ever access is a hit while the cache is not yet full
(pre-warmed). Online policies and Belady never evict a key the current
token has yet to use (the runtime pins experts it is about to run), so a key
in the cache at the start of a token is still there when used; that makes
these hit counts sequential demand-paging hits, for which Belady (MIN) is
the optimum and an upper bound of every online policy. SCH follows the spec's pseudo-code, which
has no such pinning.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .policies import BeladyPolicy, CachePolicy, make_policy

TRACE_FORMAT = "moestream-routing-trace-v1"


class TraceFormatError(ValueError):
    """A trace file or array does not follow the documented format."""


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class RoutingTrace:
    """Per sequence, per layer, per token: the k routed expert ids (and gate weights)."""

    n_layers: int
    n_experts: int
    top_k: int
    ids: list[np.ndarray] = field(default_factory=list)  # each [L, T, k]
    weights: list[np.ndarray] | None = None  # each [L, T, k] or None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_sequences(self) -> int:
        """Number of sequences."""
        return len(self.ids)

    def validate(self) -> None:
        """Check shapes, id ranges and distinct ids per token.

        Raises:
            TraceFormatError: with what is wrong and where.
        """
        if self.n_layers < 1 or self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise TraceFormatError(f"bad trace sizes L={self.n_layers} E={self.n_experts} k={self.top_k}")
        for s, a in enumerate(self.ids):
            if a.ndim != 3 or a.shape[0] != self.n_layers or a.shape[2] != self.top_k:
                raise TraceFormatError(f"sequence {s}: ids shape {a.shape}, expected [L={self.n_layers}, T, k={self.top_k}]")
            if a.size and (a.min() < 0 or a.max() >= self.n_experts):
                raise TraceFormatError(f"sequence {s}: expert ids outside 0..{self.n_experts - 1}")
            if a.size and self.top_k > 1:
                srt = np.sort(a, axis=-1)
                if (srt[..., 1:] == srt[..., :-1]).any():
                    raise TraceFormatError(f"sequence {s}: a token lists the same expert twice")
        if self.weights is not None:
            if len(self.weights) != len(self.ids) or any(w.shape != a.shape for w, a in zip(self.weights, self.ids)):
                raise TraceFormatError("weights must have one [L, T, k] array per sequence, shaped like ids")

    def layer_tokens(self, seq: int, layer: int) -> np.ndarray:
        """[T, k] expert ids of one sequence at one layer."""
        return self.ids[seq][layer]

    def model_tokens(self, seq: int) -> np.ndarray:
        """[T, L*k] ids offset by layer*E, layers in forward order (model-level cache keys)."""
        a = self.ids[seq].astype(np.int64)  # [L, T, k]
        offsets = (np.arange(self.n_layers) * self.n_experts)[:, None, None]
        return np.transpose(a + offsets, (1, 0, 2)).reshape(a.shape[1], -1)

    def save(self, path: str | Path) -> None:
        """Write the documented ``.npz``."""
        dtype = np.int16 if self.n_experts <= np.iinfo(np.int16).max else np.int32
        arrays: dict[str, Any] = {
            "format": np.array(TRACE_FORMAT), "n_layers": np.array(self.n_layers),
            "n_experts": np.array(self.n_experts), "top_k": np.array(self.top_k),
            "n_sequences": np.array(self.n_sequences), "meta": np.array(json.dumps(self.meta)),
        }
        for s, a in enumerate(self.ids):
            arrays[f"ids_{s}"] = a.astype(dtype)
            if self.weights is not None:
                arrays[f"weights_{s}"] = self.weights[s].astype(np.float32)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        """Read a trace written by ``save``.

        Raises:
            TraceFormatError: not a moestream trace, or inconsistent arrays.
            FileNotFoundError: no such file.
        """
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != TRACE_FORMAT:
                raise TraceFormatError(f"{path} is not a {TRACE_FORMAT} file (record one with `moestream analyze`)")
            n = int(z["n_sequences"])
            ids = [z[f"ids_{s}"].astype(np.int64) for s in range(n)]
            has_w = n > 0 and f"weights_{0}" in z
            weights = [z[f"weights_{s}"] for s in range(n)] if has_w else None
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
            return cls(int(z["n_layers"]), int(z["n_experts"]), int(z["top_k"]), ids, weights, meta)


class TraceRecorder:
    """Collects routing-hook calls into a RoutingTrace.

    Use as the engine's routing hook: ``model.add_routing_hook(recorder)``, with
    ``begin_sequence()`` before and ``end_sequence()`` after each text.
    Successive forward calls of one sequence (prefill then decode) are concatenated.

    Args:
        n_layers, n_experts, top_k: the model's routing shape.
        keep_weights: also store gate weights.
    """

    def __init__(self, n_layers: int, n_experts: int, top_k: int, keep_weights: bool = True) -> None:
        self.n_layers, self.n_experts, self.top_k = n_layers, n_experts, top_k
        self.keep_weights = keep_weights
        self._ids: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._cur_ids: list[list[np.ndarray]] | None = None
        self._cur_w: list[list[np.ndarray]] = []

    def begin_sequence(self) -> None:
        """Start collecting a new sequence."""
        self._cur_ids = [[] for _ in range(self.n_layers)]
        self._cur_w = [[] for _ in range(self.n_layers)]

    def __call__(self, layer: int, expert_ids: Any, gate_weights: Any) -> None:
        """Routing hook: ``expert_ids`` and ``gate_weights`` are [T, k]."""
        if self._cur_ids is None:
            raise RuntimeError("call begin_sequence() before running the model")
        self._cur_ids[layer].append(_to_numpy(expert_ids).reshape(-1, self.top_k).astype(np.int64))
        if self.keep_weights:
            self._cur_w[layer].append(_to_numpy(gate_weights).reshape(-1, self.top_k).astype(np.float32))

    def end_sequence(self) -> None:
        """Close the current sequence.

        Raises:
            TraceFormatError: layers saw different token counts.
        """
        if self._cur_ids is None:
            raise RuntimeError("end_sequence() without begin_sequence()")
        per_layer = [np.concatenate(x) if x else np.zeros((0, self.top_k), np.int64) for x in self._cur_ids]
        if len({a.shape[0] for a in per_layer}) != 1:
            raise TraceFormatError(f"layers saw different token counts: {[a.shape[0] for a in per_layer]}")
        self._ids.append(np.stack(per_layer))
        if self.keep_weights:
            self._weights.append(np.stack([np.concatenate(x) if x else np.zeros((0, self.top_k), np.float32)
                                           for x in self._cur_w]))
        self._cur_ids = None

    def trace(self, meta: dict | None = None) -> RoutingTrace:
        """The trace of all finished sequences."""
        return RoutingTrace(self.n_layers, self.n_experts, self.top_k, list(self._ids),
                            list(self._weights) if self.keep_weights else None, dict(meta or {}))


def shuffle_trace(trace: RoutingTrace, seed: int = 0) -> RoutingTrace:
    """The time-shuffled baseline: permute token positions within each sequence.

    One permutation per sequence, applied to every layer, so per-token and
    per-expert popularity are kept and only temporal order is destroyed.

    Args:
        trace: the trace.
        seed: RNG seed.

    Returns:
        A new RoutingTrace.
    """
    rng = np.random.default_rng(seed)
    ids, weights = [], [] if trace.weights is not None else None
    for s, a in enumerate(trace.ids):
        perm = rng.permutation(a.shape[1])
        ids.append(a[:, perm])
        if weights is not None:
            weights.append(trace.weights[s][:, perm])
    return RoutingTrace(trace.n_layers, trace.n_experts, trace.top_k, ids, weights,
                        {**trace.meta, "shuffled_seed": seed})


# ----------------------------------------------------------------------------- simulators

Tokens = Sequence[Sequence[Hashable]]


def _as_token_lists(tokens: Any) -> list[list]:
    return [[x.item() if hasattr(x, "item") else x for x in row] for row in tokens]


def simulate_policy(
    tokens: Any,
    capacity: int,
    policy: CachePolicy,
    hints: Sequence[Sequence[Hashable]] | None = None,
) -> int:
    """Hits of an eviction policy on one access sequence (pre-warmed; unserved keys pinned).

    Args:
        tokens: per token, its distinct keys in access order ([T, k] array or lists).
        capacity: cache size in keys (>= the largest token).
        policy: a fresh policy (consumed by the run).
        hints: optional per-token predicted keys, given to ``policy.on_hint`` before the token.

    Returns:
        Number of hits (divide by the number of accesses for the rate).

    Raises:
        ValueError: capacity smaller than a token, or a token repeats a key.
    """
    rows = _as_token_lists(tokens)
    cache: set = set()
    seen: set = set()
    hits = 0
    for t, row in enumerate(rows):
        pinned = set(row)
        if len(pinned) != len(row):
            raise ValueError(f"token {t} repeats a key: {row}")
        if len(row) > capacity:
            raise ValueError(f"capacity {capacity} is smaller than token {t}'s {len(row)} keys")
        if hints is not None:
            policy.on_hint(hints[t])
        for x in row:
            pinned.discard(x)  # keys of this token still to be served stay pinned
            if x in cache or (x not in seen and len(cache) < capacity):
                hits += 1
            seen.add(x)
            if x not in cache:
                if len(cache) >= capacity:
                    victim = policy.victim([c for c in cache if c not in pinned])
                    cache.remove(victim)
                    policy.on_evict(victim)
                cache.add(x)
                policy.on_insert(x)
            policy.on_access(x)
    return hits


def simulate_belady(tokens: Any, capacity: int) -> int:
    """Hits of Belady's MIN (the offline optimum) under the same conventions.

    Args:
        tokens: per token, its distinct keys.
        capacity: cache size in keys.

    Returns:
        Number of hits.
    """
    rows = _as_token_lists(tokens)
    return simulate_policy(rows, capacity, BeladyPolicy([x for row in rows for x in row]))


def simulate_sch(tokens: Any, capacity: int, m: int) -> int:
    """Hits of SCH(m): the spec's segment cache that sees m tokens ahead.

    Follows the spec's pseudo-code line by line: priority (cnt, last) with cnt
    the remaining uses in tokens [t, t+m), evict the minimum, hits counted at
    the start of each token, first-ever accesses hit while the cache is not full.

    Args:
        tokens: [T, k] expert ids (router order).
        capacity: C = rho * k.
        m: segment length (window includes the current token).

    Returns:
        Number of hits.
    """
    rows = _as_token_lists(tokens)
    T = len(rows)
    cnt: Counter = Counter()
    for row in rows[:m]:
        cnt.update(row)
    last: dict = {}
    clock = 0
    cache: set = set()
    seen: set = set()
    hits = 0
    for t in range(T):
        at_start = set(cache)
        for x in rows[t]:
            if x in at_start or (x not in seen and len(cache) < capacity):
                hits += 1
            seen.add(x)
            if x not in cache:
                if len(cache) >= capacity:
                    cache.remove(min(cache, key=lambda e: (cnt[e], last[e])))
                cache.add(x)
            cnt[x] -= 1
            clock += 1
            last[x] = clock
        if t + m < T:
            cnt.update(rows[t + m])
    return hits


PolicyFactory = Callable[[], CachePolicy]


def policy_hits(name: str, tokens: Any, capacity: int, *, m: int = 16, window: int = 64) -> int:
    """Hits of a named simulator: ``lru``, ``lfu``, ``consistency``, ``belady`` or ``sch``.

    Args:
        name: simulator name.
        tokens: per token, its distinct keys.
        capacity: cache size in keys.
        m: SCH's segment length.
        window: the consistency policy's window in accesses.

    Raises:
        ValueError: unknown name.
    """
    if name == "belady":
        return simulate_belady(tokens, capacity)
    if name == "sch":
        return simulate_sch(tokens, capacity, m)
    if name == "consistency":
        return simulate_policy(tokens, capacity, make_policy(name, window=window))
    return simulate_policy(tokens, capacity, make_policy(name))


def synthetic_trace(n_layers: int = 2, n_experts: int = 16, top_k: int = 2, n_sequences: int = 2,
                    seq_len: int = 64, stickiness: float = 0.8, seed: int = 0) -> RoutingTrace:
    """A locality-rich trace with balanced load, for tests and benchmarks.

    Each token keeps each of the previous token's experts with probability
    ``stickiness`` and draws the rest uniformly from the other experts, so every
    expert is equally popular on average while consecutive tokens share experts.

    Args:
        n_layers, n_experts, top_k: routing shape.
        n_sequences, seq_len: how much to generate.
        stickiness: probability of reusing each previous expert (0 = no locality).
        seed: RNG seed.

    Returns:
        A RoutingTrace (gate weights uniform 1/k).
    """
    rng = np.random.default_rng(seed)
    ids = []
    for _ in range(n_sequences):
        seq = np.zeros((n_layers, seq_len, top_k), dtype=np.int64)
        for layer in range(n_layers):
            prev = rng.choice(n_experts, top_k, replace=False)
            for t in range(seq_len):
                keep = [e for e in prev if rng.random() < stickiness] if t else list(prev)
                others = np.setdiff1d(np.arange(n_experts), keep)
                row = keep + list(rng.choice(others, top_k - len(keep), replace=False))
                seq[layer, t] = row
                prev = row
        ids.append(seq)
    weights = [np.full(a.shape, 1.0 / top_k, dtype=np.float32) for a in ids]
    return RoutingTrace(n_layers, n_experts, top_k, ids, weights, {"synthetic": True, "stickiness": stickiness})
